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
  `num_tokens`, `num_documents`, `content_blake2b` (blake2b-128 of the shard's tokens, document index and
  mask, hashed as they were written), and `mask_file` when masked}), `content_hash` (of the shards' hashes, in
  order), `loss_mask` (bool), `created` (UTC ISO-8601 timestamp), and whatever `prepare` adds (`tokenizer`: the
  path it used; `bad_utf8_documents`). Sets written before content hashes have none; readers skip the check.

Crash safety: a writer fills a sibling temporary directory `<out_dir>.tmp-XXXXXXXX`; each token file is
written as `*.partial` and renamed when complete; meta.json goes last (temp file + os.replace). Only then is
the set swapped in: an existing `out_dir` is renamed aside to `<out_dir>.old-XXXXXXXX`, the new directory
renamed to `out_dir`, the old one deleted. A directory without a valid meta.json is never accepted by
`ShardSet`, and an interrupted write never touches a previous set at `out_dir` (a killed run leaves its
`.tmp-` directory behind; it is safe to delete).
"""

from __future__ import annotations

import json
import os

import numpy as np

from megaslm.data.shard_format import (_DOCS, _DTYPES, _MASK, _TOKENS, FORMAT_VERSION, HASH_KEY,  # noqa: F401
                                       META_FILE, READABLE_VERSIONS, _is_replaceable, dtype_for_vocab)
from megaslm.data.shard_writer import ShardWriter  # noqa: F401 (re-exported: the writer lives in shard_writer.py)
from megaslm.errors import UserError


class ShardChanged(UserError):
    """A shard file shrank (or was cut) after the set was opened: reading it through its memory map would
    end the process with SIGBUS."""


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
        self._files: dict[tuple[str, int], object] = {}  # the open file of each memory map, for its size

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
    def shard_hashes(self) -> list[str | None]:
        """Each shard file's content hash, recorded by `prepare` while writing (None in older sets)."""
        return [sh.get(HASH_KEY) for sh in self.meta["shards"]]

    def changed_shard(self, saved_hashes: list | None) -> str | None:
        """One line naming the first shard whose content differs from `saved_hashes` (a loader state's, a
        cache's), or None when they agree or either side predates content hashes."""
        mine = self.shard_hashes
        if not saved_hashes or None in saved_hashes or None in mine or list(saved_hashes) == mine:
            return None
        for i in range(max(len(mine), len(saved_hashes))):
            then = saved_hashes[i] if i < len(saved_hashes) else None
            now = mine[i] if i < len(mine) else None
            if then != now:
                name = os.path.join(self.path, self.meta["shards"][i]["file"]) if i < len(mine) else f"shard {i}"
                return (f"shard file {name} holds other content than the data this was made from (content hash "
                        f"{str(then)[:12]}.. then, {str(now)[:12]}.. now): the shards were prepared again or changed")
        return None

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
        state["_maps"], state["_masks"], state["_docs"], state["_files"] = {}, {}, {}, {}
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
            if n:
                fobj = self._files[(key, i)] = open(f, "rb")
                m = np.memmap(fobj, dtype=dtype, mode="r", shape=(n,))
            else:
                m = np.zeros(0, dtype)
            cache[i] = m
        self._check_size(i, key, dtype.itemsize)
        return m

    def _check_size(self, i: int, key: str, itemsize: int) -> None:
        """One fstat per read: a file cut under the memory map raises ShardChanged instead of SIGBUS."""
        fobj = self._files.get((key, i))
        if fobj is None:
            return
        want = self.meta["shards"][i]["num_tokens"] * itemsize
        size = os.fstat(fobj.fileno()).st_size
        if size < want:
            raise ShardChanged(f"shard file {fobj.name} shrank to {size} bytes while this run read it ({want} "
                               f"bytes in {os.path.join(self.path, META_FILE)}): it was cut or is being rewritten "
                               f"in place")

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


def recorded_tokenizer(shards: ShardSet) -> str | None:
    """The tokenizer `prepare` recorded in the shards' meta.json (its path), after checking that it still has
    the fingerprint the shards were made with; None for shards prepared before paths were recorded."""
    path = shards.meta.get("tokenizer")
    if not path:
        return None
    from megaslm.data.tokenizer import load_tokenizer

    meta = os.path.join(shards.path, META_FILE)
    try:
        tok = load_tokenizer(path)
    except UserError as e:
        raise UserError(f"the tokenizer {meta} records cannot be loaded ({e}): set data.tokenizer") from None
    if tok.fingerprint != shards.fingerprint:
        raise UserError(f"the tokenizer {path} recorded in {meta} has changed since the shards were made (sha256 "
                        f"{tok.fingerprint[:12]}.. now, {shards.fingerprint[:12]}.. then): set data.tokenizer to the "
                        f"tokenizer the shards were made with")
    return path


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
