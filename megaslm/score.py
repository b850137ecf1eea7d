"""`megaslm score`: step 2 of Rho-1, every token of the training shards scored once by the reference model.

`megaslm score CONFIG.yaml [--set ...]` reads the training config (data.train, train.seq_len,
train.micro_batch_size, reference.path, reference.placement, model.dtype, parallel.tensor) and writes the
reference's per-token losses into the directory `reference.cache`. Training with that config then reads them
(megaslm.reference.CachedReference) instead of running the reference model. It runs like `megaslm train`: a plain
process, torchrun, the deepspeed launcher or srun; every data-parallel rank scores its own chunks.

Cache format (format_version 1), a directory:
- `chunks/00000000.bin`, `chunks/00000001.bin`, ...: little-endian float32 (or float16, `--storage-dtype`).
  The loader packs sequence i as tokens i*T .. i*T+T (T = seq_len), its labels being tokens i*T+1 .. i*T+T, so
  every label token belongs to exactly one sequence: the cache is exact for this seq_len. Chunk c holds sequences
  c*C .. min(n_seq, (c+1)*C) - 1 (C = `chunk_sequences`), one row of T values each: row i, column j is the
  reference loss of predicting token i*T+j+1 from tokens i*T .. i*T+j. Concatenated in order, the chunk files
  are the losses of stream positions 1 .. n_seq*T; position 0 and the tail after n_seq*T are not scored.
- `meta.json`, written last: format_version, seq_len, num_sequences, chunk_sequences, num_chunks,
  storage_dtype, compute_dtype, the shard set's identity (path, tokenizer fingerprint, num_tokens, num_documents,
  a sha256 of sampled token blocks), the reference model's path and fingerprint (sha256 of sampled bytes of its
  weight files), world_size, created.

Why chunk files rather than one file: each chunk is written by one rank into its own file and renamed into place
when complete, so (a) no two ranks (or nodes, over NFS) ever write into the same file or page, (b) the rename is
the chunk's completion marker, which makes a long scoring job resumable at chunk granularity, (c) nothing has
to be merged at the end (a merge would copy 4 bytes per token: 320 GB for 80B tokens), and (d) each rank holds
at most one chunk in memory (by default at most 2**24 tokens: 64 MiB of float32).

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
import datetime
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megaslm.errors import UserError

FORMAT_VERSION = 1
KIND = "megaslm-reference-losses"
META_FILE = "meta.json"
CHUNK_DIR = "chunks"
JOB_FILE = "job.json"
MAX_CHUNK_TOKENS = 2**24  # 64 MiB of float32 per chunk: the most a rank holds in memory
MIN_CHUNK_TOKENS = 2**16
STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}

_SAMPLE_BLOCKS = 32
_MODEL_BLOCK = 64 * 1024  # bytes per sampled block of a weight file
_TOKEN_BLOCK = 4096  # tokens per sampled block of the shard stream
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ---------------------------------------------------------------------------------------------- fingerprints
def _sampled_offsets(size: int, block: int) -> list[int]:
    """Start offsets of the blocks hashed from something of `size` units: all of it when small, else the head,
    the tail and evenly spaced blocks between (bounded cost for a 14 GB checkpoint or an 80B-token corpus)."""
    if size <= block * (_SAMPLE_BLOCKS + 2):
        return list(range(0, size, block))
    last = size - block
    return sorted({0, last, *(int(k * last / (_SAMPLE_BLOCKS + 1)) for k in range(1, _SAMPLE_BLOCKS + 1))})


def model_fingerprint(path: str) -> str:
    """sha256 over the names, sizes and sampled bytes of the weight files of a Hugging Face model directory
    (config.json when it has none). Two trainings of a model differ in every block, so sampling suffices."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
                   and f.name != "training_args.bin")
    if not files:
        files = [p / "config.json"]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            for off in _sampled_offsets(size, _MODEL_BLOCK):
                fh.seek(off)
                h.update(fh.read(_MODEL_BLOCK))
    return h.hexdigest()


def shards_identity(shards) -> dict:
    """What identifies the token stream a cache was scored on (the path is informational: shards may move)."""
    h = hashlib.sha256(shards.meta["dtype"].encode())
    n = shards.num_tokens
    for off in _sampled_offsets(n, _TOKEN_BLOCK):
        h.update(shards.read(off, min(n, off + _TOKEN_BLOCK)).tobytes())
    return {"path": shards.path, "tokenizer_fingerprint": shards.fingerprint, "num_tokens": shards.num_tokens,
            "num_documents": shards.num_documents, "content_sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------- layout
def chunk_file(cache_dir: str | os.PathLike, c: int) -> Path:
    return Path(cache_dir) / CHUNK_DIR / f"{c:08d}.bin"


def chunk_rows(c: int, chunk_sequences: int, num_sequences: int) -> tuple[int, int]:
    """Sequence range [lo, hi) of chunk c."""
    lo = c * chunk_sequences
    return lo, min(num_sequences, lo + chunk_sequences)


def read_meta(cache_dir: str | os.PathLike, what: str = "reference.cache") -> dict:
    """meta.json of a complete cache; UserError naming the directory when there is none (or a broken one)."""
    d = Path(cache_dir)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        hint = ""
        if d.parent.is_dir() and any(x.name.startswith(d.name + ".tmp-") for x in d.parent.iterdir()):
            hint = " (a `megaslm score` into it was interrupted: run it again to finish it)"
        elif not d.exists():
            hint = " (the directory does not exist: run `megaslm score CONFIG` first)"
        raise UserError(f"{what} {cache_dir} holds no complete reference-loss cache (no {META_FILE}){hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise UserError(f"{meta_path} is not a reference-loss cache written by `megaslm score`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
                        f"(expected {FORMAT_VERSION})")
    for key in ("seq_len", "num_sequences", "chunk_sequences", "num_chunks", "storage_dtype", "shards",
                "reference"):
        if key not in meta:
            raise UserError(f"{meta_path} is missing key {key!r}")
    if meta["storage_dtype"] not in STORAGE_DTYPES:
        raise UserError(f"{meta_path}: unknown storage_dtype {meta['storage_dtype']!r}")
    return meta


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """True when `cache_dir` holds a meta.json (what `megaslm score` writes last)."""
    return (Path(cache_dir) / META_FILE).is_file()


def _is_replaceable(path: Path) -> bool:
    """Absent, empty, or a cache (possibly unfinished): anything else is the user's and is left alone."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return all(n in (META_FILE, CHUNK_DIR, JOB_FILE) for n in os.listdir(path))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_chunk(path: Path, values: np.ndarray) -> None:
    """Write one chunk so that its final name appears only once it is complete and on disk."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(values.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _swap_in(work: Path, out: Path) -> None:
    if not _is_replaceable(out):  # re-check: something may have appeared meanwhile
        raise UserError(f"reference.cache {out} exists and is not a reference-loss cache; refusing to replace it")
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def score(cfg, *, chunk_tokens: int | None = None, storage_dtype: str = "float32", force: bool = False) -> int:
    """Score `cfg.data.train` with `cfg.reference.path` into `cfg.reference.cache`; see the module docstring.
    Call on every rank. Returns the exit code (non-zero only when stopped by a signal and not requeued)."""
    ref = cfg.reference
    if not ref.path:
        raise UserError("reference.path is required by `megaslm score` (the reference model to score with)")
    if not ref.cache:
        raise UserError("reference.cache is required by `megaslm score` (the output directory)")
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--storage-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise UserError(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
    out = Path(os.path.realpath(ref.cache))  # a symlink to scratch: build and swap beside its target
    if not _is_replaceable(out):
        raise UserError(f"reference.cache {ref.cache} exists and is not a reference-loss cache; refusing to "
                        "replace it (choose a new or empty directory)")
    import torch  # after the cheap checks: a config error is reported without loading torch and transformers
    import torch.distributed as dist

    from megaslm.data.shards import ShardSet
    from megaslm.parallel import dist as mdist
    from megaslm.parallel.groups import ParallelGroups
    from megaslm.reference import OnlineReference, check_reference_tokenizer
    from megaslm.train.faults import maybe_fail
    from megaslm.train.preempt import Preemption
    from megaslm.train.trainer import training_dtype

    if not isinstance(cfg.data.train, str):
        raise UserError("data.train is a mixture: score one shard directory at a time (set data.train to it); "
                        "training with a mixture uses an online reference (reference.path)")
    shards = ShardSet(cfg.data.train)
    T = cfg.train.seq_len
    n_seq = (shards.num_tokens - 1) // T
    if n_seq < 1:
        raise UserError(f"data.train {cfg.data.train} holds {shards.num_tokens} tokens: not one sequence of "
                        f"train.seq_len {T} (+1) to score")
    check_reference_tokenizer(ref.path, shards.vocab_size, shards.fingerprint, cfg.data.train)

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
        model_fp = model_fingerprint(ref.path)
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
            _write_json(work / JOB_FILE, job)
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
    reference = OnlineReference(ref.path, ref.placement, dtype=dtype, micro_batch_size=cfg.train.micro_batch_size,
                                dp_size=groups.dp_size, mpu=mpu, tp_group=groups.tp_group, tp_size=groups.tp_size)
    B, W, me = cfg.train.micro_batch_size, groups.dp_size, groups.dp_rank
    say(f"scoring {shards.path} ({n_seq} sequences of {T} tokens, {num_chunks} chunks of {C}) with {ref.path} "
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
                        raise UserError(f"reference model {ref.path} gave a non-finite loss on sequence {bad} of "
                                        f"{shards.path} (tokens {bad * T}..{bad * T + T}); try model.dtype=fp32")
                    values[a - lo:b - lo] = v
                if groups.tp_rank == 0:
                    _write_chunk(chunk_file(work, mine), values)
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
        meta = {"format_version": FORMAT_VERSION, "kind": KIND, "seq_len": T, "num_sequences": n_seq,
                "chunk_sequences": C, "num_chunks": num_chunks, "storage_dtype": storage_dtype,
                "compute_dtype": str(dtype).replace("torch.", ""), "shards": shards_identity(shards),
                "reference": {"path": os.path.abspath(ref.path), "fingerprint": plan["model_fp"],
                              "placement": reference.placement},
                "world_size": world,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        (work / JOB_FILE).unlink(missing_ok=True)
        _write_json(work / META_FILE, meta)
        _swap_in(work, out)
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
    p.add_argument("--storage-dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="dtype of the stored losses (default float32; float16 halves the disk space)")
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
