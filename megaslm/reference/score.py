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
from pathlib import Path

import numpy as np

from megaslm.errors import UserError
from megaslm.reference.cache import (CHUNK_DIR, DEFAULT_STORAGE_DTYPE, JOB_FILE, MAX_CHUNK_TOKENS, META_FILE, MIN_CHUNK_TOKENS,
                                     cache_meta, STORAGE_DTYPES, is_replaceable, swap_in, write_chunk,
                                     write_json_synced, chunk_file, chunk_rows, is_complete, model_fingerprint, read_meta,
                                     shards_identity)


# ---------------------------------------------------------------------------------------------- scoring
def _job(cfg, shards, model_fp: str, compute_dtype: str, storage_dtype: str, chunk_sequences: int) -> dict:
    """Everything the values depend on; its hash names the work directory, so a re-run resumes the same job."""
    ident = shards_identity(shards)
    return {"seq_len": cfg.train.seq_len, "chunk_sequences": chunk_sequences, "storage_dtype": storage_dtype,
            "compute_dtype": compute_dtype, "model_fingerprint": model_fp,
            "shards": {k: ident[k] for k in ("tokenizer_fingerprint", "num_tokens", "num_documents",
                                             "content_sha256")}}


def _job_of_meta(meta: dict) -> dict:
    s = meta["shards"]
    return {"seq_len": meta["seq_len"], "chunk_sequences": meta["chunk_sequences"],
            "storage_dtype": meta["storage_dtype"], "compute_dtype": meta.get("compute_dtype"),
            "model_fingerprint": meta["reference"].get("fingerprint"),
            "shards": {k: s.get(k) for k in ("tokenizer_fingerprint", "num_tokens", "num_documents",
                                             "content_sha256")}}


def _fmt_time(s: float) -> str:
    s = int(s)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def default_chunk_tokens(num_tokens: int) -> int:
    """About 1024 chunks, so that the work spreads over up to ~1000 ranks, within [2**16, 2**24] tokens. It
    depends on the corpus only, not on the world size, so a job can resume on another number of ranks."""
    return min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, num_tokens // 1024))


def score(cfg, *, chunk_tokens: int | None = None, storage_dtype: str = DEFAULT_STORAGE_DTYPE, force: bool = False) -> int:
    """Score `cfg.data.train` with `cfg.reference.path` into `cfg.reference.cache`; see the module docstring.
    Call on every rank. Returns the exit code (non-zero only when stopped by a signal and not requeued)."""
    from megaslm.config import reference_paths

    ref = cfg.reference
    paths = reference_paths(cfg)
    if len(paths) != 1:
        raise UserError(f"reference.path must name one model for `megaslm score` (the reference model to score "
                        f"with), got {len(paths)}")
    ref_path = paths[0]
    if not ref.cache:
        raise UserError("reference.cache is required by `megaslm score` (the output directory)")
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UserError(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
    out = Path(os.path.realpath(ref.cache))  # a symlink to scratch: build and swap beside its target
    if not is_replaceable(out):
        raise UserError(f"reference.cache {ref.cache} exists and is not a reference-loss cache; refusing to "
                        "replace it (choose a new or empty directory)")
    import torch  # after the cheap checks: a config error is reported without loading torch and transformers
    import torch.distributed as dist

    from megaslm.data.shards import ShardSet
    from megaslm.parallel import dist as mdist
    from megaslm.parallel.groups import ParallelGroups
    from megaslm.precision import training_dtype
    from megaslm.reference.online import OnlineReference, check_reference_tokenizer
    from megaslm.train.faults import maybe_fail
    from megaslm.train.preempt import Preemption

    if not isinstance(cfg.data.train, str):
        raise UserError("data.train is a mixture: score one shard directory at a time (set data.train to it); "
                        "training with a mixture uses an online reference (reference.path)")
    shards = ShardSet(cfg.data.train)
    T = cfg.train.seq_len
    n_seq = (shards.num_tokens - 1) // T
    if n_seq < 1:
        raise UserError(f"data.train {cfg.data.train} holds {shards.num_tokens} tokens: not one sequence of "
                        f"train.seq_len {T} (+1) to score")
    check_reference_tokenizer(ref_path, shards.vocab_size, shards.fingerprint, cfg.data.train)

    preemption = Preemption()  # first, so a signal during model loading is honoured after the first round
    mdist.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    groups = ParallelGroups(cfg.parallel.tensor)
    dtype = training_dtype(cfg)
    device = mdist.device()
    C = max(1, (chunk_tokens or default_chunk_tokens(shards.num_tokens)) // T)
    num_chunks = math.ceil(n_seq / C)
    np_dtype = STORAGE_DTYPES[storage_dtype]

    def say(msg: str) -> None:
        if main:
            print(f"megaslm score: {msg}", flush=True)

    # Rank 0 decides (fingerprints, what is already done) and tells the others: one view of the file system.
    plan: list = [None]
    if main:
        model_fp = model_fingerprint(ref_path)
        job = _job(cfg, shards, model_fp, str(dtype).replace("torch.", ""), storage_dtype, C)
        key = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
        work = out.parent / f"{out.name}.tmp-{key}"
        if not force and is_complete(out):
            try:
                same = _job_of_meta(read_meta(out)) == job
            except UserError:
                same = False
            if same:
                plan[0] = {"done": True}
        if plan[0] is None:
            (work / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
            write_json_synced(work / JOB_FILE, job)
            done = set()
            for f in (work / CHUNK_DIR).iterdir():
                if f.name.endswith(".partial"):
                    f.unlink()  # a chunk that was being written when the job died
                    continue
                if not (f.suffix == ".bin" and f.stem.isdigit()):
                    continue
                c = int(f.stem)
                lo, hi = chunk_rows(c, C, n_seq)
                if c < num_chunks and f.stat().st_size == (hi - lo) * T * np_dtype.itemsize:
                    done.add(c)
            stale = [x.name for x in out.parent.iterdir() if x.name.startswith(out.name + ".tmp-") and x != work]
            plan[0] = {"done": False, "work": str(work), "todo": [c for c in range(num_chunks) if c not in done],
                       "model_fp": model_fp, "n_done": len(done), "stale": stale}
    dist.broadcast_object_list(plan, src=0)
    plan = plan[0]
    if plan["done"]:
        say(f"{ref.cache} already holds this cache (same shards, seq_len, model and dtypes); nothing to do "
            "(--force scores again)")
        return 0
    work, todo = Path(plan["work"]), plan["todo"]
    if plan["stale"]:
        say(f"note: other unfinished scoring jobs beside the cache ({', '.join(plan['stale'])}); delete them "
            "if they are not going to be resumed")
    if plan["n_done"]:
        say(f"resuming {work}: {plan['n_done']} of {num_chunks} chunks already scored")

    mpu = groups if groups.tp_size > 1 else None
    reference = OnlineReference(ref_path, ref.placement, dtype=dtype, micro_batch_size=cfg.train.micro_batch_size,
                                dp_size=groups.dp_size, mpu=mpu, tp_group=groups.tp_group, tp_size=groups.tp_size)
    B, W, me = cfg.train.micro_batch_size, groups.dp_size, groups.dp_rank
    say(f"scoring {shards.path} ({n_seq} sequences of {T} tokens, {num_chunks} chunks of {C}) with {ref_path} "
        f"({reference.placement}, {str(dtype).replace('torch.', '')}) on {world} ranks (dp {W} x tp "
        f"{groups.tp_size}), micro-batch {B}, into {ref.cache}")

    def forward(lo: int, hi: int) -> np.ndarray:
        flat = torch.from_numpy(shards.read(lo * T, hi * T + 1).astype(np.int64))
        input_ids = flat[:-1].view(hi - lo, T).to(device)
        labels = flat[1:].view(hi - lo, T).to(device)
        return reference.losses(input_ids, labels).cpu().numpy()

    pad_ids = torch.full((1, T), shards.eos_id, dtype=torch.long, device=device)
    pad_labels = torch.full((1, T), -100, dtype=torch.long, device=device)
    t0, seqs_done, last_print = time.time(), 0, 0.0
    rounds = math.ceil(len(todo) / W)
    for k in range(rounds):
        batch = todo[k * W:(k + 1) * W]
        sizes = [chunk_rows(c, C, n_seq)[1] - chunk_rows(c, C, n_seq)[0] for c in batch]
        # Every rank runs the same number of forwards: a ZeRO-3 reference gathers its weights collectively.
        n_micro = math.ceil(max(sizes) / B)
        mine = batch[me] if me < len(batch) else None
        with torch.no_grad():
            if mine is None:
                for _ in range(n_micro):
                    reference.losses(pad_ids, pad_labels)
            else:
                lo, hi = chunk_rows(mine, C, n_seq)
                values = np.empty((hi - lo, T), np_dtype)
                for m in range(n_micro):
                    a, b = lo + m * B, min(hi, lo + (m + 1) * B)
                    if a >= hi:
                        reference.losses(pad_ids, pad_labels)
                        continue
                    v = forward(a, b)
                    if not np.isfinite(v).all():
                        bad = a + int(np.argwhere(~np.isfinite(v))[0][0])
                        raise UserError(f"reference model {ref_path} gave a non-finite loss on sequence {bad} of "
                                        f"{shards.path} (tokens {bad * T}..{bad * T + T}); try model.dtype=fp32")
                    values[a - lo:b - lo] = v
                if groups.tp_rank == 0:
                    write_chunk(chunk_file(work, mine), values)
                maybe_fail("crash_in_score", mine)
        seqs_done += sum(sizes)
        stop = torch.tensor([1.0 if preemption.requested() else 0.0], device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        now = time.time()
        if main and (now - last_print >= 10 or k == rounds - 1 or stop.item() > 0):
            last_print = now
            dt = max(now - t0, 1e-9)
            left = (len(todo) - (k + 1) * W) / max(1, (k + 1) * W) * dt if k < rounds - 1 else 0.0
            say(f"{plan['n_done'] + min(len(todo), (k + 1) * W)}/{num_chunks} chunks | {seqs_done / dt:.1f} seq/s | "
                f"{seqs_done * T / dt:.0f} tok/s | elapsed {_fmt_time(dt)} | eta {_fmt_time(left)}")
        if stop.item() > 0:
            say(f"stop signal: {plan['n_done'] + min(len(todo), (k + 1) * W)} of {num_chunks} chunks are in {work}; "
                "run the same command again to finish")
            return preemption.after_checkpoint(main)

    dist.barrier()  # every chunk is on disk
    elapsed = time.time() - t0
    if main:
        for c in range(num_chunks):
            lo, hi = chunk_rows(c, C, n_seq)
            f = chunk_file(work, c)
            if not f.is_file() or f.stat().st_size != (hi - lo) * T * np_dtype.itemsize:
                raise RuntimeError(f"chunk {f} is missing or has the wrong size after scoring")
        meta = cache_meta(seq_len=T, num_sequences=n_seq, chunk_sequences=C, storage_dtype=storage_dtype,
                          compute_dtype=str(dtype).replace("torch.", ""), shards=shards, world_size=world,
                          reference={"path": os.path.abspath(ref_path), "fingerprint": plan["model_fp"],
                                     "placement": reference.placement})
        (work / JOB_FILE).unlink(missing_ok=True)
        write_json_synced(work / META_FILE, meta)
        swap_in(work, out)
        scored = seqs_done * T
        say(f"done: {seqs_done} sequences ({scored} tokens) scored in {elapsed:.1f} s "
            f"({scored / max(elapsed, 1e-9):.0f} tok/s on {world} ranks); cache in {ref.cache}")
    dist.barrier()
    return 0


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
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Entry point of `megaslm score` (every rank)."""
    from megaslm.config import load_config

    cfg = load_config(args.config, args.overrides)
    import torch.distributed as dist

    try:
        return score(cfg, chunk_tokens=args.chunk_tokens, storage_dtype=args.storage_dtype, force=args.force)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """`python -m megaslm.score CONFIG ...`: the same as `megaslm score CONFIG ...`."""
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
