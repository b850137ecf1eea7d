"""The on-disk cache of reference losses (`megaslm score` writes it, `CachedReference` reads it).

Cache format (format_version 1), a directory:
- `chunks/00000000.bin`, `chunks/00000001.bin`, ...: little-endian float16 (the default since the measurement in
  docs/objectives.md) or float32 (`--storage-dtype`; older caches), as meta.json's storage_dtype says.
  The loader packs sequence i as tokens i*T .. i*T+T (T = seq_len), its labels being tokens i*T+1 .. i*T+T, so
  every label token belongs to exactly one sequence: the cache is exact for this seq_len. Chunk c holds sequences
  c*C .. min(n_seq, (c+1)*C) - 1 (C = `chunk_sequences`), one row of T values each: row i, column j is the
  reference loss of predicting token i*T+j+1 from tokens i*T .. i*T+j. Concatenated in order, the chunk files
  are the losses of stream positions 1 .. n_seq*T; position 0 and the tail after n_seq*T are not scored.
- `meta.json`, written last: format_version, seq_len, num_sequences, chunk_sequences, num_chunks,
  storage_dtype, compute_dtype, the shard set's identity (path, tokenizer fingerprint, num_tokens, num_documents,
  a sha256 of sampled token blocks, every shard file's content hash from `prepare`), the reference model's path and fingerprint (sha256 of sampled bytes of its
  weight files), world_size, created.

Why chunk files rather than one file: each chunk is written by one rank into its own file and renamed into place
when complete, so (a) no two ranks (or nodes, over NFS) ever write into the same file or page, (b) the rename is
the chunk's completion marker, which makes a long scoring job resumable at chunk granularity, (c) nothing has
to be merged at the end (a merge would copy 4 bytes per token: 320 GB for 80B tokens), and (d) each rank holds
at most one chunk in memory (by default at most 2**24 tokens: 64 MiB of float32).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from megaslm import atomic
from megaslm.errors import UserError

FORMAT_VERSION = 1
KIND = "megaslm-reference-losses"
META_FILE = "meta.json"
CHUNK_DIR = "chunks"
JOB_FILE = "job.json"
MAX_CHUNK_TOKENS = 2**24  # 64 MiB of float32 per chunk: the most a rank holds in memory
MIN_CHUNK_TOKENS = 2**16
STORAGE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
# float16 changed < 0.1% of the selected tokens on the demo corpus (docs/objectives.md); float32 caches stay readable.
DEFAULT_STORAGE_DTYPE = "float16"

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
            "num_documents": shards.num_documents, "content_sha256": h.hexdigest(),
            "shard_hashes": shards.shard_hashes}  # every shard file's content hash (prepare's), where recorded


# ---------------------------------------------------------------------------------------------- layout
def chunk_file(cache_dir: str | os.PathLike, c: int) -> Path:
    return Path(cache_dir) / CHUNK_DIR / f"{c:08d}.bin"


def chunk_rows(c: int, chunk_sequences: int, num_sequences: int) -> tuple[int, int]:
    """Sequence range [lo, hi) of chunk c."""
    lo = c * chunk_sequences
    return lo, min(num_sequences, lo + chunk_sequences)


def cache_meta(*, seq_len: int, num_sequences: int, chunk_sequences: int, storage_dtype: str, compute_dtype: str,
               shards, reference: dict, world_size: int) -> dict:
    """The meta.json of a complete cache (see the module docstring)."""
    return {"format_version": FORMAT_VERSION, "kind": KIND, "seq_len": seq_len, "num_sequences": num_sequences,
            "chunk_sequences": chunk_sequences, "num_chunks": -(-num_sequences // chunk_sequences),
            "storage_dtype": storage_dtype, "compute_dtype": compute_dtype, "shards": shards_identity(shards),
            "reference": reference, "world_size": world_size,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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


def _ours(name: str) -> bool:
    return name in (META_FILE, CHUNK_DIR, JOB_FILE)


def is_replaceable(path: Path) -> bool:
    """Absent, empty, or a cache (possibly unfinished): anything else is the user's and is left alone."""
    return atomic.is_replaceable(path, _ours)


def write_json_synced(path: Path, obj: dict) -> None:
    atomic.write_json(path, obj, indent=1, temp_suffix=".partial")


def write_chunk(path: Path, values: np.ndarray) -> None:
    """Write one chunk so that its final name appears only once it is complete and on disk."""
    atomic.write_bytes(path, values.tobytes(), temp_suffix=".partial")


def swap_in(work: Path, out: Path) -> None:
    atomic.swap_dir(work, out, _ours, f"reference.cache {out} exists and is not a reference-loss cache; refusing to "
                    "replace it")


class CachedReference:
    """Reference losses read from a cache written by `megaslm score` (format: the module docstring above).

    Checked at construction, each failure a UserError naming both values: the cache is complete (meta.json), was
    scored at this seq_len, on this token stream (tokenizer, token and document counts, sampled content hash),
    its chunk files are all there with the right sizes, and, when `model_path` is given, with that very model.
    """

    placement = "cache"

    def forward_flops_per_token(self, seq_len: int) -> float:
        return 0.0  # nothing runs per token during training

    def __init__(self, cache_dir: str, shards, seq_len: int, *, model_path: str | None = None):
        self.cache_dir = str(cache_dir)
        meta = read_meta(cache_dir)
        self.meta = meta
        where = f"reference.cache {cache_dir}"
        if meta["seq_len"] != int(seq_len):
            raise UserError(f"{where} was scored at seq_len {meta['seq_len']} but train.seq_len is {seq_len}: "
                            "score again with this seq_len (the cache is exact for one seq_len only)")
        have, want = meta["shards"], shards_identity(shards)
        for key in ("tokenizer_fingerprint", "num_tokens", "num_documents", "content_sha256"):
            if have.get(key) != want[key]:
                raise UserError(f"{where} was scored on the shards {have.get('path')} ({key} {have.get(key)}) "
                                f"but data.train {shards.path} has {key} {want[key]}: not the same token stream")
        changed = shards.changed_shard(have.get("shard_hashes"))  # the sampled hash reads blocks; this, all bytes
        if changed:
            raise UserError(f"{where} was scored on other data than data.train: {changed}; score again")
        if model_path:
            fp = model_fingerprint(model_path)
            cached = meta["reference"].get("fingerprint")
            if fp != cached:
                raise UserError(f"{where} was scored with the reference model {meta['reference'].get('path')} "
                                f"(fingerprint {str(cached)[:12]}) but reference.path {model_path} has fingerprint "
                                f"{fp[:12]}: score again with this model, or drop reference.path")
        self.seq_len = int(seq_len)
        self.num_sequences = int(meta["num_sequences"])
        self.chunk_sequences = int(meta["chunk_sequences"])
        self._dtype = STORAGE_DTYPES[meta["storage_dtype"]]
        self._files = []
        for c in range(int(meta["num_chunks"])):
            f = chunk_file(cache_dir, c)
            lo, hi = chunk_rows(c, self.chunk_sequences, self.num_sequences)
            size = (hi - lo) * self.seq_len * self._dtype.itemsize
            if not f.is_file() or f.stat().st_size != size:
                raise UserError(f"{where}: chunk file {f} is missing or not {size} bytes; the cache is damaged, "
                                "score again")
            self._files.append(str(f))

    def sequences(self, index) -> np.ndarray:
        """float32 [len(index), seq_len]: the cached losses of the labels of sequences `index` (all >= 0)."""
        T, C = self.seq_len, self.chunk_sequences
        out = np.empty((len(index), T), np.float32)
        for k, i in enumerate(np.asarray(index, dtype=np.int64).reshape(-1)):
            if not 0 <= i < self.num_sequences:
                raise UserError(f"reference.cache {self.cache_dir} covers sequences 0..{self.num_sequences - 1} "
                                f"of seq_len {T}; sequence {i} is not in it")
            c, r = divmod(int(i), C)
            out[k] = np.fromfile(self._files[c], dtype=self._dtype, count=T, offset=r * T * self._dtype.itemsize)
        return out

    def token_losses(self, start: int, end: int) -> np.ndarray:
        """float32 losses of stream positions [start, end) (the loss of predicting token p); NaN where the cache
        does not cover a position (position 0 and the tail after num_sequences * seq_len)."""
        out = np.full(max(0, end - start), np.nan, np.float32)
        lo, hi = max(start, 1), min(end, self.num_sequences * self.seq_len + 1)
        p = lo
        while p < hi:  # position p is row (p-1) // T, column (p-1) % T
            i, j = divmod(p - 1, self.seq_len)
            n = min(hi - p, self.seq_len - j)
            out[p - start:p - start + n] = self.sequences([i])[0, j:j + n]
            p += n
        return out

    def losses_for(self, batch: dict) -> torch.Tensor:
        """float32 [B, T] on labels' device: the cached losses of rows with index >= 0, zeros for padding rows
        (index -1) and for labels == -100, like OnlineReference."""
        labels = batch["labels"]
        if labels.shape[-1] != self.seq_len:
            raise ValueError(f"batch seq_len {labels.shape[-1]} != cache seq_len {self.seq_len}")
        index = batch["index"].detach().cpu().numpy().reshape(-1)
        out = np.zeros(tuple(labels.shape), np.float32)
        rows = np.nonzero(index >= 0)[0]
        if len(rows):
            out[rows] = self.sequences(index[rows])
        out[labels.detach().cpu().numpy() == -100] = 0.0
        if np.isnan(out).any():
            k = int(np.argwhere(np.isnan(out))[0][0])
            raise UserError(f"reference.cache {self.cache_dir} holds no loss for a token of sequence {index[k]}")
        return torch.from_numpy(out).to(labels.device)


