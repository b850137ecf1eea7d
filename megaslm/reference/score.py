"""`megaslm score`: step 2 of Rho-1, every token of the training shards scored once by the reference model.

`megaslm score CONFIG.yaml [--set ...]` reads the training config (data.train, train.seq_len,
train.micro_batch_size, reference.path, reference.placement, model.dtype, parallel.tensor) and writes the
reference's per-token losses into the directory `reference.cache`. Training with that config then reads them
(megaslm.reference.CachedReference) instead of running the reference model. It runs like `megaslm train`: a plain
process, torchrun, the deepspeed launcher or srun; every data-parallel rank scores its own chunks.

The cache format is described in megaslm/reference/cache.py.

Crash safety and preemption: chunks are written into `<cache>.tmp-<job key>`, a work directory named by a
hash of what is scored (shards, seq_len, model, dtypes, chunk size). Re-running the same command after a crash,
a kill or a preemption finds it and scores only the missing chunks, on any number of ranks. On SIGUSR1/SIGTERM
(Slurm's warning signal, preemption) the ranks finish the current round of chunks, stop, and rank 0 requeues
the job as training does. Only when every chunk is on disk does rank 0 write meta.json and rename the work
directory to `<cache>` (a previous cache there is replaced only at that moment). A directory without meta.json
is never loaded, so an interrupted score never leaves a cache that loads and never damages an existing one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaslm.errors import UserError
from megaslm.monitor import hms
from megaslm.reference import score_docs
from megaslm.reference.cache import (CHUNK_DIR, DEFAULT_STORAGE_DTYPE, JOB_FILE, MAX_CHUNK_TOKENS, META_FILE,
                                     MIN_CHUNK_TOKENS, STORAGE_DTYPES, cache_meta, chunk_file, chunk_rows,
                                     is_complete, is_replaceable, model_fingerprint, read_meta, shards_identity,
                                     swap_in, write_chunk, write_json_synced)

PROGRESS_EVERY_S = 15  # the progress line's period (rank 0), within a chunk as well


# ---------------------------------------------------------------------------------------------- scoring
def _job(cfg, shards, model_fp: str, compute_dtype: str, storage_dtype: str, chunk_sequences: int,
         alignment: str | None = None) -> dict:
    """Everything the values depend on; its hash names the work directory, so a re-run resumes the same job."""
    ident = shards_identity(shards)
    job = {"seq_len": cfg.train.seq_len, "chunk_sequences": chunk_sequences, "storage_dtype": storage_dtype,
           "compute_dtype": compute_dtype, "model_fingerprint": model_fp,
           "shards": {k: ident[k] for k in ("tokenizer_fingerprint", "num_tokens", "num_documents",
                                            "content_sha256")}}
    return job if alignment is None else {**job, "alignment": alignment}  # same-tokenizer keys as before


def _job_of_meta(meta: dict) -> dict:
    s, alignment = meta["shards"], meta["reference"].get("alignment")
    job = {"seq_len": meta["seq_len"], "chunk_sequences": meta["chunk_sequences"],
           "storage_dtype": meta["storage_dtype"], "compute_dtype": meta.get("compute_dtype"),
           "model_fingerprint": meta["reference"].get("fingerprint"),
           "shards": {k: s.get(k) for k in ("tokenizer_fingerprint", "num_tokens", "num_documents",
                                            "content_sha256")}}
    return job if alignment is None else {**job, "alignment": alignment}


def default_chunk_tokens(num_tokens: int) -> int:
    """About 1024 chunks, so that the work spreads over up to ~1000 ranks, within [2**16, 2**24] tokens. It
    depends on the corpus only, not on the world size, so a job can resume on another number of ranks."""
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, num_tokens // 1024))


@dataclass
class Job:
    """What one `megaslm score` scores: the shard set in `chunks` of `C` sequences of `T` tokens, into `out`."""
    cfg: object
    ref_path: str
    out: Path
    shards: object
    T: int
    n_seq: int
    C: int
    num_chunks: int
    storage_dtype: str
    pair: object = None  # a CrossTokenizer when the reference has another tokenizer (score_docs.py)

    @property
    def np_dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.storage_dtype]

    def rows(self, c: int) -> tuple[int, int]:
        return chunk_rows(c, self.C, self.n_seq)

    def chunk_bytes(self, c: int) -> int:
        lo, hi = self.rows(c)
        return (hi - lo) * self.T * self.np_dtype.itemsize


def score(cfg, *, chunk_tokens: int | None = None, storage_dtype: str = DEFAULT_STORAGE_DTYPE, force: bool = False) -> int:
    """Score `cfg.data.train` with `cfg.reference.path` into `cfg.reference.cache`; see the module docstring.
    Call on every rank. Returns the exit code (non-zero only when stopped by a signal and not requeued).
    Phases, as a checkpoint's: plan (rank 0 decides what is left), rounds (every rank scores), commit (rank 0
    checks every chunk, writes meta.json and swaps the cache in)."""
    job = _job_of_config(cfg, chunk_tokens, storage_dtype)
    # After the cheap checks: a config error is reported without loading torch, transformers or DeepSpeed.
    import torch.distributed as dist

    from megaslm.reference.cross import tokenizer_pair
    from megaslm.reference.online import OnlineReference
    from megaslm.runtime import start_run

    job.pair = tokenizer_pair(job.ref_path, job.shards, cfg.data.tokenizer)
    run = start_run(cfg)  # as training: signals first, so one during model loading stops after the first round

    def say(msg: str) -> None:
        if run.is_main:
            print(f"megaslm score: {msg}", flush=True)

    plan = _plan(job, run, force)
    if plan["done"]:
        say(f"{cfg.reference.cache} already holds this cache (same shards, seq_len, model and dtypes); nothing to do "
            "(--force scores again)")
        return 0
    if plan["stale"]:
        say(f"note: other unfinished scoring jobs beside the cache ({', '.join(plan['stale'])}); delete them "
            "if they are not going to be resumed")
    if plan["n_done"]:
        say(f"resuming {plan['work']}: {plan['n_done']} of {job.num_chunks} chunks already scored")
    g = run.groups
    reference = OnlineReference(job.ref_path, cfg.reference.placement, dtype=run.dtype,
                                micro_batch_size=cfg.train.micro_batch_size, dp_size=g.dp_size,
                                mpu=g if g.tp_size > 1 else None, tp_group=g.tp_group, tp_size=g.tp_size)
    say(f"scoring {job.shards.path} ({job.n_seq} sequences of {job.T} tokens, {job.num_chunks} chunks of {job.C}) "
        f"with {job.ref_path} ({reference.placement}, {_dtype_name(run.dtype)}) on {run.world} ranks (dp "
        f"{g.dp_size} x tp {g.tp_size}), micro-batch {cfg.train.micro_batch_size}, into {cfg.reference.cache}")
    t0 = time.time()
    seqs_done = _rounds(job, plan, run, reference, say)
    if seqs_done is None:
        return run.preemption.after_checkpoint(run.is_main)
    dist.barrier()  # every chunk is on disk
    if run.is_main:
        _commit(job, plan, run, reference.placement)
        scored, elapsed = seqs_done * job.T, time.time() - t0
        say(f"done: {seqs_done} sequences ({scored} tokens) scored in {elapsed:.1f} s "
            f"({scored / max(elapsed, 1e-9):.0f} tok/s on {run.world} ranks); cache in {cfg.reference.cache}")
    dist.barrier()
    return 0


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _job_of_config(cfg, chunk_tokens: int | None, storage_dtype: str) -> Job:
    """The job, after every check that needs no model: UserError on a bad config or argument."""
    from megaslm.config import reference_paths
    from megaslm.data.shards import ShardSet

    paths = reference_paths(cfg)
    if len(paths) != 1:
        raise UserError(f"reference.path must name one model for `megaslm score` (the reference model to score "
                        f"with), got {len(paths)}")
    if not cfg.reference.cache:
        raise UserError("reference.cache is required by `megaslm score` (the output directory)")
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UserError(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
    out = Path(os.path.realpath(cfg.reference.cache))  # a symlink to scratch: build and swap beside its target
    if not is_replaceable(out):
        raise UserError(f"reference.cache {cfg.reference.cache} exists and is not a reference-loss cache; refusing "
                        "to replace it (choose a new or empty directory)")
    if not isinstance(cfg.data.train, str):
        raise UserError("data.train is a mixture: score one shard directory at a time (set data.train to it); "
                        "training with a mixture uses an online reference (reference.path)")
    shards = ShardSet(cfg.data.train)
    T = cfg.train.seq_len
    n_seq = (shards.num_tokens - 1) // T
    if n_seq < 1:
        raise UserError(f"data.train {cfg.data.train} holds {shards.num_tokens} tokens: not one sequence of "
                        f"train.seq_len {T} (+1) to score")
    C = max(1, (chunk_tokens or default_chunk_tokens(shards.num_tokens)) // T)
    return Job(cfg, paths[0], out, shards, T, n_seq, C, math.ceil(n_seq / C), storage_dtype)


def _plan(job: Job, run, force: bool) -> dict:
    """Rank 0 decides (fingerprints, what is already done) and tells the others: one view of the file system."""
    import torch.distributed as dist

    plan: list = [None]
    if run.is_main:
        model_fp = model_fingerprint(job.ref_path)
        ident = _job(job.cfg, job.shards, model_fp, _dtype_name(run.dtype), job.storage_dtype, job.C,
                     None if job.pair is None else score_docs.ALIGNMENT)
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        out = job.out
        work = out.parent / f"{out.name}.tmp-{key}"
        if not force and is_complete(out):
            try:
                same = _job_of_meta(read_meta(out)) == ident
            except UserError:
                same = False
            if same:
                plan[0] = {"done": True}
        if plan[0] is None:
            (work / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
            write_json_synced(work / JOB_FILE, ident)
            done = _chunks_on_disk(job, work)
            stale = [x.name for x in out.parent.iterdir() if x.name.startswith(out.name + ".tmp-") and x != work]
            plan[0] = {"done": False, "work": str(work), "todo": [c for c in range(job.num_chunks) if c not in done],
                       "model_fp": model_fp, "n_done": len(done), "stale": stale}
    dist.broadcast_object_list(plan, src=0)
    return plan[0]


def _chunks_on_disk(job: Job, work: Path) -> set[int]:
    """The chunks a previous run of this job finished (a chunk being written when it died is removed)."""
    done = set()
    for f in (work / CHUNK_DIR).iterdir():
        if f.name.endswith(".partial"):
            f.unlink()
            continue
        if not (f.suffix == ".bin" and f.stem.isdigit()):
            continue
        c = int(f.stem)
        if c < job.num_chunks and f.stat().st_size == job.chunk_bytes(c):
            done.add(c)
    return done


def _rounds(job: Job, plan: dict, run, reference, say) -> int | None:
    """Every rank scores one chunk per round; the sequences scored, or None when a stop signal ended it early."""
    import torch
    import torch.distributed as dist

    from megaslm.faults import maybe_fail

    work, todo, W = Path(plan["work"]), plan["todo"], run.groups.dp_size
    starts = None if job.pair is None else score_docs.document_starts(job.shards)
    t0, seqs_done, last_print = time.time(), 0, 0.0
    rounds = math.ceil(len(todo) / W)
    total = sum(job.rows(c)[1] - job.rows(c)[0] for c in todo)
    for k in range(rounds):
        batch = todo[k * W:(k + 1) * W]
        sizes = [job.rows(c)[1] - job.rows(c)[0] for c in batch]
        mine = batch[run.groups.dp_rank] if run.groups.dp_rank < len(batch) else None

        def tick(frac: float) -> None:
            # Within a round too: a 135M reference on a CPU takes minutes per chunk. Rank 0's share of its own
            # chunk stands for the round's.
            nonlocal last_print
            now = time.time()
            done, dt = seqs_done + frac * sum(sizes), now - t0
            if not run.is_main or now - last_print < PROGRESS_EVERY_S or done <= 0:
                return
            last_print = now
            say(f"{plan['n_done'] + k * W}/{job.num_chunks} chunks, round {k + 1}/{rounds} at {frac:.0%} | "
                f"{done * job.T / dt:.0f} tok/s | elapsed {hms(dt)} | eta {hms((total - done) * dt / max(done, 1e-9))}")

        with torch.no_grad():
            if job.pair is None:
                n_micro = math.ceil(max(sizes) / job.cfg.train.micro_batch_size)
                values = _score_chunk(job, mine, n_micro, run, reference, tick)
            else:  # another tokenizer: whole documents in the reference's tokens (score_docs.py)
                values = score_docs.score_chunk(job, mine, run, reference, job.pair, starts, tick)
        if mine is not None:
            if run.groups.tp_rank == 0:
                write_chunk(chunk_file(work, mine), values)
            maybe_fail("crash_in_score", mine)
        seqs_done += sum(sizes)
        stop = torch.tensor([1.0 if run.preemption.requested() else 0.0], device=run.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # sync point: every rank stops after the same round
        now, finished = time.time(), plan["n_done"] + min(len(todo), (k + 1) * W)
        if run.is_main and (now - last_print >= PROGRESS_EVERY_S or k == rounds - 1 or stop.item() > 0):
            last_print = now
            dt = max(now - t0, 1e-9)
            left = (len(todo) - (k + 1) * W) / max(1, (k + 1) * W) * dt if k < rounds - 1 else 0.0
            say(f"{finished}/{job.num_chunks} chunks | {seqs_done / dt:.1f} seq/s | {seqs_done * job.T / dt:.0f} "
                f"tok/s | elapsed {hms(dt)} | eta {hms(left)}")
        if stop.item() > 0:
            say(f"stop signal: {finished} of {job.num_chunks} chunks are in {work}; run the same command again to "
                "finish")
            return None
    return seqs_done


def _score_chunk(job: Job, chunk: int | None, n_micro: int, run, reference, tick=lambda frac: None
                 ) -> np.ndarray | None:
    """The losses of `chunk` ([rows, T]), in `n_micro` forwards: every rank runs as many as the largest chunk of
    the round needs (a ZeRO-3 reference gathers its weights collectively), padding with an ignored batch."""
    import torch

    T, B = job.T, job.cfg.train.micro_batch_size
    pad_ids = torch.full((1, T), job.shards.eos_id, dtype=torch.long, device=run.device)
    pad_labels = torch.full((1, T), -100, dtype=torch.long, device=run.device)
    lo, hi = job.rows(chunk) if chunk is not None else (0, 0)
    values = np.empty((hi - lo, T), job.np_dtype) if chunk is not None else None
    for m in range(n_micro):
        a, b = lo + m * B, min(hi, lo + (m + 1) * B)
        tick(m / n_micro)
        if a >= hi:
            reference.losses(pad_ids, pad_labels)
            continue
        flat = torch.from_numpy(job.shards.read(a * T, b * T + 1).astype(np.int64))
        v = reference.losses(flat[:-1].view(b - a, T).to(run.device),
                             flat[1:].view(b - a, T).to(run.device)).cpu().numpy()
        if not np.isfinite(v).all():
            bad = a + int(np.argwhere(~np.isfinite(v))[0][0])
            raise UserError(f"reference model {job.ref_path} gave a non-finite loss on sequence {bad} of "
                            f"{job.shards.path} (tokens {bad * T}..{bad * T + T}); try model.dtype=fp32")
        values[a - lo:b - lo] = v
    return values


def _commit(job: Job, plan: dict, run, placement: str) -> None:
    """Rank 0, once every chunk is on disk: check them all, write meta.json last, swap the cache in."""
    work = Path(plan["work"])
    for c in range(job.num_chunks):
        f = chunk_file(work, c)
        if not f.is_file() or f.stat().st_size != job.chunk_bytes(c):
            raise RuntimeError(f"chunk {f} is missing or has the wrong size after scoring")
    meta = cache_meta(seq_len=job.T, num_sequences=job.n_seq, chunk_sequences=job.C, storage_dtype=job.storage_dtype,
                      compute_dtype=_dtype_name(run.dtype), shards=job.shards, world_size=run.world,
                      reference={"path": os.path.abspath(job.ref_path), "fingerprint": plan["model_fp"],
                                 "placement": placement,
                                 "alignment": None if job.pair is None else score_docs.ALIGNMENT})
    (work / JOB_FILE).unlink(missing_ok=True)
    write_json_synced(work / META_FILE, meta)
    swap_in(work, job.out)


# ---------------------------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `megaslm score`."""
    p.add_argument("config", help="the training YAML config (data.train, train.seq_len, reference.path, "
                                  "reference.cache, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.micro_batch_size=16")
    p.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default=DEFAULT_STORAGE_DTYPE,
                   help="dtype of the stored losses (default float16: half the disk of float32; on the demo corpus "
                        "it changed < 0.1%% of the selected tokens, see docs/objectives.md)")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per chunk file, the unit of work and of resumption (default: about 1/1024 of the "
                        f"corpus, between {MIN_CHUNK_TOKENS} and {MAX_CHUNK_TOKENS})")
    p.add_argument("--force", action="store_true",
                   help="score again even if reference.cache already holds this very cache")
    p.add_argument("--import", dest="import_files", nargs="+", default=None, metavar="FILE",
                   help="write reference.cache from log-probabilities computed elsewhere (JSONL, one record per "
                        "document; format in megaslm/reference/imported.py) instead of running reference.path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Entry point of `megaslm score` (every rank)."""
    from megaslm.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "import_files", None):
        from megaslm.reference.imported import import_logprobs

        return import_logprobs(cfg, args.import_files, storage_dtype=args.storage_dtype, force=args.force)
    import torch.distributed as dist

    try:
        return score(cfg, chunk_tokens=args.chunk_tokens, storage_dtype=args.storage_dtype, force=args.force)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m megaslm.reference.score CONFIG ...`: the same as `megaslm score CONFIG ...`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    p = argparse.ArgumentParser(prog="megaslm score", description="Score the training shards with the reference "
                                "model into reference.cache (step 2 of Rho-1).")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
