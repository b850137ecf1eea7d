"""Token shards on disk: the output of `prepare`, the input of the loader.

Format (format_version 2; version 1 sets, which have no loss masks, are still read). A shard set is a directory
holding:

- `tokens_00000.bin`, `tokens_00001.bin`, ...: the token stream, raw little-endian integers, `uint16` when
  the tokenizer's vocab_size <= 65535, else `uint32`. Every document is its token ids followed by the EOS id.
  Concatenating the files in order gives the whole stream; a document never spans two files (a file is
  closed before the document that would push it past `max_tokens_per_shard`, so a file exceeds that size
  only when it holds a single, larger document).
- `docs_00000.npy`, ... (one per token file): an int64 array of shape [2, num_documents]: row 0 holds the
  start offset of every document within that token file (ascending), row 1 the index into `sources` of the
  input file each document came from. (Rows, not columns, so each is contiguous when memory-mapped.)
- `mask_00000.bin`, ... (one per token file, only when meta's `loss_mask` is true): one uint8 per token, 1 when
  the token carries a loss as a label (the response of a prompt/response pair, an assistant turn), 0 when it is
  context only (a prompt, a user turn). A document's EOS takes the mask of the document's last token. Sets
  without mask files train on every token.
- `meta.json`, written last:
  `format_version` (2), `dtype` ("uint16" | "uint32"), `vocab_size`, `tokenizer_fingerprint` (sha256 hex of
  the tokenizer model file), `eos_id`, `num_tokens`, `num_documents`, `sources` (input paths, in order),
  `source_tokens` / `source_documents` (per-source totals), `shards` (list of {`file`, `docs_file`,
  `num_tokens`, `num_documents`, and `mask_file` when masked}), `loss_mask` (bool), `created` (UTC ISO-8601
  timestamp), and whatever `prepare` adds about its input (e.g. `bad_utf8_documents`).

Crash safety: a writer fills a sibling temporary directory `<out_dir>.tmp-XXXXXXXX`; each token file is
written as `*.partial` and renamed when complete; meta.json goes last (temp file + os.replace). Only then is
the set swapped in: an existing `out_dir` is renamed aside to `<out_dir>.old-XXXXXXXX`, the new directory
renamed to `out_dir`, the old one deleted. A directory without a valid meta.json is never accepted by
`ShardSet`, and an interrupted write never touches a previous set at `out_dir` (a killed run leaves its
`.tmp-` directory behind; it is safe to delete).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile

import numpy as np

from megaslm.atomic import umask
from megaslm.errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
_TOKENS = "tokens_{:05d}.bin"
_MASK = "mask_{:05d}.bin"
_DOCS = "docs_{:05d}.npy"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    """Storage dtype name for a vocabulary size."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def _is_replaceable(path: str) -> bool:
    """True if `path` may be replaced by a new shard set: absent, empty, or itself a shard set (or the
    remains of one). Anything else is the user's directory and is left alone."""
    if not os.path.exists(path):
        return True
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return all(n == META_FILE or (n.startswith(("tokens_", "docs_", "mask_")) and n.endswith((".bin", ".npy", ".partial")))
               for n in names)


class ShardWriter:
    """Append documents to a new shard set at `out_dir`; `close()` makes it visible atomically.

    Use as a context manager (or call `abort()` on failure) so an exception removes the temporary
    directory. Memory is bounded by `buffer_tokens` plus the per-file document index."""

    def __init__(self, out_dir: str, vocab_size: int, fingerprint: str, eos_id: int, sources: list[str],
                 max_tokens_per_shard: int = 2**27, buffer_tokens: int = 1 << 20, loss_mask: bool = False):
        # realpath: if out_dir is a symlink (e.g. to scratch space), build and swap next to its target.
        self.out_dir = os.path.realpath(out_dir)
        if not _is_replaceable(self.out_dir):
            raise UserError(f"output {out_dir} exists and is not a shard set; refusing to replace it "
                            "(choose a new or empty directory)")
        if not 0 <= eos_id < vocab_size:
            raise UserError(f"eos_id {eos_id} is outside the vocabulary (vocab_size {vocab_size})")
        if max_tokens_per_shard < 1:
            raise UserError(f"max_tokens_per_shard must be positive, got {max_tokens_per_shard}")
        self.vocab_size = int(vocab_size)
        self.fingerprint = str(fingerprint)
        self.eos_id = int(eos_id)
        self.sources = [str(s) for s in sources]
        self.max_tokens_per_shard = int(max_tokens_per_shard)
        self.buffer_tokens = int(buffer_tokens)
        self.loss_mask = bool(loss_mask)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self._np_dtype = _DTYPES[self.dtype]
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(self.out_dir) + ".tmp-", dir=parent)
        os.chmod(self.tmp_dir, 0o777 & ~umask())  # mkdtemp's 0700 would become the shard directory's mode
        self._shards: list[dict] = []
        self._source_tokens = [0] * len(self.sources)
        self._source_docs = [0] * len(self.sources)
        self._file = None
        self._closed = False
        self._open_shard()

    # -- shard files --------------------------------------------------------------------------------------
    def _open_shard(self) -> None:
        idx = len(self._shards)
        self._cur = {"file": _TOKENS.format(idx), "docs_file": _DOCS.format(idx), "num_tokens": 0,
                     "num_documents": 0}
        self._file = open(os.path.join(self.tmp_dir, self._cur["file"] + ".partial"), "wb")
        self._mask_file = None
        if self.loss_mask:
            self._cur["mask_file"] = _MASK.format(idx)
            self._mask_file = open(os.path.join(self.tmp_dir, self._cur["mask_file"] + ".partial"), "wb")
        self._buf: list[np.ndarray] = []
        self._mask_buf: list[np.ndarray] = []
        self._buf_len = 0
        self._doc_rows: list[np.ndarray] = []  # chunks of [2, n]: (starts, sources)

    def _flush(self) -> None:
        if self._buf:
            self._file.write(np.concatenate(self._buf).tobytes())
            self._buf, self._buf_len = [], 0
        if self._mask_buf:
            self._mask_file.write(np.concatenate(self._mask_buf).tobytes())
            self._mask_buf = []

    def _finish_shard(self) -> None:
        self._flush()
        for key, f in (("file", self._file), ("mask_file", self._mask_file)):
            if f is None:
                continue
            f.flush()
            os.fsync(f.fileno())
            f.close()
            tmp = os.path.join(self.tmp_dir, self._cur[key])
            os.replace(tmp + ".partial", tmp)
        self._file = self._mask_file = None
        docs = np.concatenate(self._doc_rows, axis=1) if self._doc_rows else np.zeros((2, 0), np.int64)
        np.save(os.path.join(self.tmp_dir, self._cur["docs_file"]), docs.astype(np.int64))
        self._shards.append(self._cur)

    # -- public -------------------------------------------------------------------------------------------
    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return sum(self._source_docs)

    @property
    def num_tokens(self) -> int:
        """Tokens (EOS included) added so far."""
        return sum(self._source_tokens)

    def add_document(self, ids, source_index: int, loss_mask=None) -> None:
        """Append one document (its ids, then EOS) from input `source_index`."""
        ids = np.asarray(ids)
        self.add_documents(ids, np.array([len(ids)]), source_index, loss_mask)

    def add_documents(self, flat_ids, lengths, source_index: int, loss_mask=None) -> None:
        """Append several documents at once: `flat_ids` is their ids concatenated (no EOS), `lengths` the
        length of each. Same result as `add_document` per document, with less Python overhead. `loss_mask`
        (aligned with `flat_ids`; only for a writer made with loss_mask=True, default all ones) marks the tokens
        that carry a loss."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not 0 <= source_index < len(self.sources):
            raise ValueError(f"source_index {source_index} out of range for {len(self.sources)} sources")
        flat = np.asarray(flat_ids).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if len(lengths) == 0:
            return
        if int(lengths.sum()) != len(flat) or (lengths < 0).any():
            raise ValueError("lengths do not add up to the number of ids")
        if len(flat) and (flat.min() < 0 or flat.max() >= self.vocab_size):
            bad = flat[(flat < 0) | (flat >= self.vocab_size)][0]
            raise UserError(f"token id {int(bad)} is outside the vocabulary (vocab_size {self.vocab_size}) while "
                            f"writing {self.sources[source_index]}; wrong tokenizer?")
        # Insert EOS after every document: document i occupies out[starts[i] : starts[i] + len_i + 1].
        with_eos = lengths + 1
        starts = np.zeros(len(lengths), np.int64)
        np.cumsum(with_eos[:-1], out=starts[1:])
        out = np.full(int(with_eos.sum()), self.eos_id, dtype=self._np_dtype)
        mask = np.ones(len(out), bool)
        mask[starts + lengths] = False
        out[mask] = flat
        out_mask = self._eos_extended_mask(loss_mask, flat, lengths, starts, mask)
        self._source_tokens[source_index] += len(out)
        self._source_docs[source_index] += len(lengths)
        # Cut into shard files at document boundaries.
        i = 0
        while i < len(lengths):
            room = self.max_tokens_per_shard - self._cur["num_tokens"]
            ends = starts[i:] + with_eos[i:] - starts[i]  # cumulative size if docs i..j are added
            j = i + int(np.searchsorted(ends, room, side="right"))
            if j == i:
                if self._cur["num_tokens"] > 0:  # the next document does not fit: start a new file
                    self._finish_shard()
                    self._open_shard()
                    continue
                j = i + 1  # a single document larger than a whole shard gets a file to itself
            a, b = int(starts[i]), int(starts[j - 1] + with_eos[j - 1])
            rows = np.empty((2, j - i), np.int64)
            rows[0] = starts[i:j] - a + self._cur["num_tokens"]
            rows[1] = source_index
            self._doc_rows.append(rows)
            self._buf.append(out[a:b])
            if out_mask is not None:
                self._mask_buf.append(out_mask[a:b])
            self._buf_len += b - a
            self._cur["num_tokens"] += b - a
            self._cur["num_documents"] += j - i
            if self._buf_len >= self.buffer_tokens:
                self._flush()
            i = j

    def _eos_extended_mask(self, loss_mask, flat, lengths, starts, not_eos) -> np.ndarray | None:
        """The per-token mask of the stream written for these documents (EOS takes its document's last mask)."""
        if loss_mask is None:
            return np.ones(len(not_eos), np.uint8) if self.loss_mask else None
        if not self.loss_mask:
            raise ValueError("loss_mask given to a ShardWriter made without loss_mask=True")
        m = np.asarray(loss_mask).reshape(-1).astype(np.uint8)
        if len(m) != len(flat):
            raise ValueError(f"loss_mask has {len(m)} entries for {len(flat)} ids")
        out = np.empty(len(not_eos), np.uint8)
        out[not_eos] = m
        last = starts + lengths - 1  # index of each document's last token (EOS position - 1)
        out[starts + lengths] = np.where(lengths > 0, out[np.maximum(last, starts)], 1)
        return out

    def close(self, extra_meta: dict | None = None) -> dict:
        """Finish the files, write meta.json (plus `extra_meta`), swap the set into `out_dir`; returns meta."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        try:
            if self._cur["num_tokens"] > 0 or not self._shards:
                self._finish_shard()
            else:
                for key, f in (("file", self._file), ("mask_file", self._mask_file)):
                    if f is not None:
                        f.close()
                        os.unlink(os.path.join(self.tmp_dir, self._cur[key] + ".partial"))
            meta = {
                "format_version": FORMAT_VERSION,
                "dtype": self.dtype,
                "vocab_size": self.vocab_size,
                "tokenizer_fingerprint": self.fingerprint,
                "eos_id": self.eos_id,
                "num_tokens": int(sum(s["num_tokens"] for s in self._shards)),
                "num_documents": int(sum(s["num_documents"] for s in self._shards)),
                "sources": self.sources,
                "source_tokens": [int(x) for x in self._source_tokens],
                "source_documents": [int(x) for x in self._source_docs],
                "shards": self._shards,
                "loss_mask": self.loss_mask,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **(extra_meta or {}),
            }
            tmp_meta = os.path.join(self.tmp_dir, META_FILE + ".partial")
            with open(tmp_meta, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_meta, os.path.join(self.tmp_dir, META_FILE))
            self._swap_in()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return meta

    def _swap_in(self) -> None:
        if not _is_replaceable(self.out_dir):  # re-check: something may have appeared meanwhile
            raise UserError(f"output {self.out_dir} exists and is not a shard set; refusing to replace it")
        old = None
        if os.path.exists(self.out_dir):
            old = tempfile.mkdtemp(prefix=os.path.basename(self.out_dir) + ".old-", dir=os.path.dirname(self.out_dir))
            os.rmdir(old)
            os.rename(self.out_dir, old)
        os.rename(self.tmp_dir, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far; a previous set at out_dir is untouched."""
        for f in (self._file, getattr(self, "_mask_file", None)):
            if f is not None:
                f.close()
        self._file = self._mask_file = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self.abort()


class ShardSet:
    """A validated shard set; reads tokens by global offset through memory maps (opened lazily)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(str(path))
        meta_path = os.path.join(self.path, META_FILE)
        if not os.path.isdir(self.path):
            raise UserError(f"shard directory {path} does not exist")
        if not os.path.isfile(meta_path):
            hint = ""
            parent, base = os.path.split(self.path)
            if any(n.startswith(base + ".tmp-") for n in os.listdir(parent)):
                hint = " (a prepare into it seems to have been interrupted; run it again)"
            raise UserError(f"shard directory {path} has no {META_FILE}; not a complete shard set{hint}")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{meta_path} is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise UserError(f"{meta_path} is not a JSON object")
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise UserError(f"{meta_path}: format_version {meta.get('format_version')!r} is not supported "
                            f"(this megaslm reads {', '.join(map(str, READABLE_VERSIONS))}; prepare the shards again)")
        for key in ("dtype", "vocab_size", "tokenizer_fingerprint", "eos_id", "num_tokens", "num_documents",
                    "sources", "shards"):
            if key not in meta:
                raise UserError(f"{meta_path} is missing key {key!r}")
        if meta["dtype"] not in _DTYPES:
            raise UserError(f"{meta_path}: unknown dtype {meta['dtype']!r}")
        self.meta = meta
        self._dtype = _DTYPES[meta["dtype"]]
        total = 0
        for s in meta["shards"]:
            if not (isinstance(s, dict) and isinstance(s.get("num_tokens"), int) and s.get("num_tokens", -1) >= 0
                    and isinstance(s.get("file"), str) and isinstance(s.get("docs_file"), str)):
                raise UserError(f"{meta_path}: malformed shard entry {s!r}")
            f = os.path.join(self.path, s["file"])
            if not os.path.isfile(f):
                raise UserError(f"shard file {f} listed in {meta_path} is missing")
            size = os.path.getsize(f)
            if size != s["num_tokens"] * self._dtype.itemsize:
                raise UserError(f"shard file {f} has {size} bytes but {meta_path} says {s['num_tokens']} "
                                f"{meta['dtype']} tokens ({s['num_tokens'] * self._dtype.itemsize} bytes)")
            d = os.path.join(self.path, s["docs_file"])
            if not os.path.isfile(d):
                raise UserError(f"document index {d} listed in {meta_path} is missing")
            if meta.get("loss_mask"):
                m = os.path.join(self.path, str(s.get("mask_file")))
                if not os.path.isfile(m) or os.path.getsize(m) != s["num_tokens"]:
                    raise UserError(f"loss-mask file {m} listed in {meta_path} is missing or not {s['num_tokens']} "
                                    "bytes; prepare the shards again")
            total += s["num_tokens"]
        if total != meta["num_tokens"]:
            raise UserError(f"{meta_path}: shard sizes add up to {total} tokens, not num_tokens {meta['num_tokens']}")
        sizes = np.array([s["num_tokens"] for s in meta["shards"]], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # global offset of each file
        self._maps: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}
        self._docs: dict[int, np.ndarray] = {}

    # -- properties ---------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.meta["num_documents"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @property
    def sources(self) -> list[str]:
        return list(self.meta["sources"])

    @property
    def has_loss_mask(self) -> bool:
        """True when the set carries per-token loss masks (SFT data from `prepare --prompt-field ...`)."""
        return bool(self.meta.get("loss_mask"))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"ShardSet({self.path!r}, num_tokens={self.num_tokens}, vocab_size={self.vocab_size})"

    def __getstate__(self):  # memory maps do not pickle; reopen them lazily in the other process
        state = dict(self.__dict__)
        state["_maps"], state["_masks"], state["_docs"] = {}, {}, {}
        return state

    # -- reading ------------------------------------------------------------------------------------------
    def _tokens(self, i: int) -> np.ndarray:
        return self._memmap(i, "file", self._dtype, self._maps)

    def _mask(self, i: int) -> np.ndarray:
        return self._memmap(i, "mask_file", np.dtype(np.uint8), self._masks)

    def _memmap(self, i: int, key: str, dtype: np.dtype, cache: dict) -> np.ndarray:
        """Shard i's per-token file named by meta key `key`, memory-mapped once and cached."""
        m = cache.get(i)
        if m is None:
            n = self.meta["shards"][i]["num_tokens"]
            f = os.path.join(self.path, self.meta["shards"][i][key])
            m = np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
            cache[i] = m
        return m

    def _doc_index(self, i: int) -> np.ndarray:
        d = self._docs.get(i)
        if d is None:
            f = os.path.join(self.path, self.meta["shards"][i]["docs_file"])
            d = np.load(f, mmap_mode="r")
            if d.shape != (2, self.meta["shards"][i]["num_documents"]):
                raise UserError(f"document index {f} has shape {d.shape}, expected "
                                f"(2, {self.meta['shards'][i]['num_documents']})")
            self._docs[i] = d
        return d

    def _check_range(self, start: int, end: int) -> tuple[int, int]:
        start, end = int(start), int(end)
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token range [{start}, {end}) outside {self.path} ({self.num_tokens} tokens)")
        return start, end

    def _pieces(self, start: int, end: int):
        """(file index, local start, local end, offset in output) for each file the range touches."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < end:
            while self._starts[i + 1] <= pos:  # skip empty files
                i += 1
            a = pos - int(self._starts[i])
            b = min(end, int(self._starts[i + 1])) - int(self._starts[i])
            yield i, a, b, pos - start
            pos += b - a
            i += 1

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the whole stream (crossing file boundaries), as a new array of the
        storage dtype (uint16/uint32)."""
        start, end = self._check_range(start, end)
        out = np.empty(end - start, self._dtype)
        for i, a, b, o in self._pieces(start, end):
            out[o:o + b - a] = self._tokens(i)[a:b]
        return out

    def read_loss_mask(self, start: int, end: int) -> np.ndarray:
        """bool [end - start]: whether each token of [start, end) carries a loss (all True without masks)."""
        start, end = self._check_range(start, end)
        if not self.has_loss_mask:
            return np.ones(end - start, bool)
        out = np.empty(end - start, bool)
        for i, a, b, o in self._pieces(start, end):
            out[o:o + b - a] = self._mask(i)[a:b] != 0
        return out

    def source_of_tokens(self, start: int, end: int) -> np.ndarray:
        """Index into `sources` of the document each token in [start, end) belongs to (int64)."""
        start, end = self._check_range(start, end)
        out = np.empty(end - start, np.int64)
        for i, a, b, o in self._pieces(start, end):
            docs = self._doc_index(i)  # binary search on the memory map touches O(log n) pages
            doc = np.searchsorted(docs[0], np.arange(a, b), side="right") - 1
            out[o:o + b - a] = docs[1][doc]
        return out


def check_compatible(shards: ShardSet, vocab_size: int, fingerprint: str | None, model_desc: str) -> None:
    """Raise UserError unless `shards` were tokenized for a model with this vocab_size (and, when given,
    by the tokenizer with this fingerprint)."""
    tok = f"tokenizer sha256 {shards.fingerprint[:12]}.."
    if shards.vocab_size != int(vocab_size):
        raise UserError(f"shards {shards.path} were tokenized with vocab_size {shards.vocab_size} ({tok}) but "
                        f"model {model_desc} has vocab_size {vocab_size}")
    if fingerprint is not None and fingerprint != shards.fingerprint:
        raise UserError(f"shards {shards.path} were tokenized by a different tokenizer ({tok}) than the one "
                        f"given for model {model_desc} (sha256 {fingerprint[:12]}..)")
