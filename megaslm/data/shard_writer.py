"""Writing a shard set (format: megaslm/data/shards.py): documents appended to a temporary directory, swapped in
whole by `close()`."""

from __future__ import annotations

import datetime
import os
import shutil

import numpy as np

from megaslm import atomic
from megaslm.data.shard_format import (_DOCS, _DTYPES, _MASK, _TOKENS, FORMAT_VERSION, HASH_KEY, META_FILE,
                                       _is_replaceable, _ours, content_hasher, dtype_for_vocab, set_hash)
from megaslm.errors import UserError


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
        self.tmp_dir = atomic.work_dir(self.out_dir)
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
        # Content hashes, fed with the bytes as they are written (no second pass over the files).
        self._hash = {"file": content_hasher(), "mask_file": content_hasher(), "docs_file": content_hasher()}
        self._buf: list[np.ndarray] = []
        self._mask_buf: list[np.ndarray] = []
        self._buf_len = 0
        self._doc_rows: list[np.ndarray] = []  # chunks of [2, n]: (starts, sources)

    def _flush(self) -> None:
        if self._buf:
            data = np.concatenate(self._buf).tobytes()
            self._hash["file"].update(data)
            self._file.write(data)
            self._buf, self._buf_len = [], 0
        if self._mask_buf:
            data = np.concatenate(self._mask_buf).tobytes()
            self._hash["mask_file"].update(data)
            self._mask_file.write(data)
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
        docs = np.ascontiguousarray(docs, dtype=np.int64)
        self._hash["docs_file"].update(docs.tobytes())
        np.save(os.path.join(self.tmp_dir, self._cur["docs_file"]), docs)
        # One hash of the shard's content: its tokens, its document index (array bytes) and its loss mask.
        h = content_hasher()
        for key in ("file", "docs_file", "mask_file"):
            if key in self._cur:
                h.update(self._hash[key].digest())
        self._cur[HASH_KEY] = h.hexdigest()
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
                "content_hash": set_hash(self._shards),
                "loss_mask": self.loss_mask,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **(extra_meta or {}),
            }
            atomic.write_json(os.path.join(self.tmp_dir, META_FILE), meta, indent=1, sort_keys=False,
                              temp_suffix=".partial")
            self._swap_in()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return meta

    def _swap_in(self) -> None:
        atomic.swap_dir(self.tmp_dir, self.out_dir, _ours,
                        f"output {self.out_dir} exists and is not a shard set; refusing to replace it")

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
