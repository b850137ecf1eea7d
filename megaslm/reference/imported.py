"""`megaslm score CONFIG --import FILES`: log-probabilities computed by any engine, aligned into a normal cache.

Input: JSONL files, one record per document of the training shards (data.train), in any order:
    {"doc": 17,                      # the document's index in the shards (0-based, stream order), and/or
     "text": "...",                  # its text (without "doc": matched to the shards' document with that text)
     "tokens": ["Hel", "lo", ...],   # the engine's tokens as strings, concatenating to the text, or
     "spans": [[0, 3], [3, 5], ...], # their byte spans [start, end) in the text's UTF-8
     "logprobs": [-2.1, -0.3, ...],  # log p(token | all before it); null where the engine gave none (counts 0)
     "eos_logprob": -1.2}            # optional: log p(end of document | the document); else 0
The log-probabilities are carried onto the trained tokens by bytes (align.py's rule); the document's EOS takes
-eos_logprob. `bench/logprobs_transformers.py` (and `bench/logprobs_vllm.py`, vLLM's prompt_logprobs) write such
files; with `--block-tokens train.seq_len` the transformers one scores exactly what `megaslm score` does with a
reference of another tokenizer (score_docs.py), so both give the same cache.

Refused in one line naming the file, line and document: a text that does not match the shards' document, a
record for no document, a document twice, tokens that do not spell the text, and (after all files) a document
with no record. data.tokenizer must name the shards' tokenizer (to lay its tokens on bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from megaslm.errors import UserError
from megaslm.reference.align import carry, spans_of_lengths


def _records(files: list[str]):
    for f in files:
        try:
            fh = open(f, encoding="utf-8")
        except OSError as e:
            raise UserError(f"--import {f}: cannot be read ({e.strerror})") from None
        with fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{f} line {n}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict):
                        raise UserError(f"{f} line {n}: not a JSON object")
                    yield f"{f} line {n}", rec


def _spans(where: str, rec: dict, text: bytes) -> np.ndarray:
    if "spans" in rec:
        spans = np.asarray(rec["spans"], np.int64).reshape(-1, 2)
        if len(spans) and (spans[:, 0].min() < 0 or spans[:, 1].max() > len(text) or (spans[:, 1] < spans[:, 0]).any()
                           or (spans[1:, 0] < spans[:-1, 1]).any()):
            raise UserError(f"{where}: spans must be ascending, non-overlapping byte ranges within the text's "
                            f"{len(text)} bytes")
        return spans
    if "tokens" not in rec:
        raise UserError(f"{where}: a record needs \"tokens\" or \"spans\"")
    pieces = [str(t).encode("utf-8") for t in rec["tokens"]]
    if b"".join(pieces) != text:
        raise UserError(f"{where}: the tokens do not concatenate to the document's text (use byte \"spans\" when "
                        "tokens split characters)")
    return spans_of_lengths([len(p) for p in pieces])


def import_logprobs(cfg, files: list[str], *, storage_dtype: str, force: bool = False) -> int:
    """Write reference.cache from the imported files; see the module docstring."""
    from megaslm.reference.cache import is_replaceable

    if not cfg.reference.cache:
        raise UserError("reference.cache is required by `megaslm score --import` (the output directory)")
    out = Path(os.path.realpath(cfg.reference.cache))
    if not is_replaceable(out):
        raise UserError(f"reference.cache {cfg.reference.cache} exists and is not a reference-loss cache; refusing "
                        "to replace it (choose a new or empty directory)")
    shards, layout = _shards_and_layout(cfg)
    T = cfg.train.seq_len
    n_seq = (shards.num_tokens - 1) // T
    if n_seq < 1:
        raise UserError(f"data.train {shards.path} holds not one sequence of train.seq_len {T} (+1)")
    flat, n_docs = _carried_stream(files, shards, layout, n_seq * T)
    _write_cache(out, files, shards, T, flat.reshape(n_seq, T), storage_dtype)
    print(f"megaslm score: imported {n_docs} documents from {len(files)} file(s) into {cfg.reference.cache} "
          f"({n_seq} sequences of {T} tokens)", flush=True)
    return 0


def _shards_and_layout(cfg):
    from megaslm.data.shards import ShardSet
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.xtok import Layout

    shards = ShardSet(cfg.data.train)
    if not cfg.data.tokenizer:
        raise UserError("data.tokenizer is required by `megaslm score --import` (the shards' tokenizer, to lay its "
                        "tokens on bytes)")
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.fingerprint != shards.fingerprint:
        raise UserError(f"data.tokenizer {cfg.data.tokenizer} (sha256 {tok.fingerprint[:12]}) is not the tokenizer of "
                        f"data.train {shards.path} (sha256 {shards.fingerprint[:12]})")
    return shards, Layout(tok)


def _carried_stream(files: list[str], shards, layout, n: int) -> tuple[np.ndarray, int]:
    """float64 [n]: the carried loss of stream positions 1..n from the files' records; the documents read."""
    from megaslm.reference.score_docs import document_starts, document_window

    starts = document_starts(shards)
    needed = int(np.searchsorted(starts, n, side="right"))  # documents holding a cached label
    flat = np.full(n, np.nan, np.float64)
    seen: dict[int, str] = {}
    by_text = None
    for where, rec in _records(files):
        if "doc" not in rec and isinstance(rec.get("text"), str) and by_text is None:
            by_text = _text_index(layout, shards, starts)
        d = _document_of(where, rec, starts, by_text, seen, shards.path)
        seen[d] = where
        s, window = document_window(shards, starts, d)
        text_pos, _, spans, wb = layout.segments(window)
        if "text" in rec and rec["text"].encode("utf-8") != wb:
            raise UserError(f"{where}: the text of document {d} does not match data.train {shards.path} "
                            f"(first difference at byte {_first_diff(rec['text'].encode('utf-8'), wb)})")
        ref_spans = _spans(f"{where} (document {d})", rec, wb)
        lp = rec.get("logprobs")
        if not isinstance(lp, list) or len(lp) != len(ref_spans):
            raise UserError(f"{where}: document {d} needs one log-probability per token ({len(ref_spans)}), got "
                            f"{len(lp) if isinstance(lp, list) else lp!r}")
        carried = np.zeros(len(window), np.float64)
        carried[text_pos] = carry(spans, ref_spans, [0.0 if x is None else -float(x) for x in lp])
        carried[-1] = -float(rec.get("eos_logprob") or 0.0)
        a, b = max(s, 1), min(s + len(window) - 1, n + 1)  # the stream positions of this document's tokens
        if b > a:
            flat[a - 1:b - 1] = carried[1:][a - s:b - s]
    missing = [d for d in range(needed) if d not in seen]
    if missing:
        raise UserError(f"document {missing[0]} of data.train {shards.path} has no log-probabilities in "
                        f"{', '.join(files)} ({len(missing)} of {needed} documents missing)")
    if not np.isfinite(flat).all():
        raise UserError(f"a log-probability in {', '.join(files)} is not finite")
    return flat, len(seen)


def _document_of(where: str, rec: dict, starts, by_text, seen: dict, shards_path: str) -> int:
    if "doc" in rec:
        d = rec["doc"]
        if not isinstance(d, int) or not 0 <= d < len(starts):
            raise UserError(f"{where}: \"doc\" {d!r} is not a document of data.train {shards_path} "
                            f"(0..{len(starts) - 1})")
        if d in seen:
            raise UserError(f"{where}: document {d} was already given at {seen[d]}")
        return d
    if not isinstance(rec.get("text"), str):
        raise UserError(f"{where}: a record needs \"doc\" (the document's index) or \"text\"")
    d = _take(by_text, rec["text"].encode("utf-8"), seen)
    if d is None:
        raise UserError(f"{where}: no document of data.train {shards_path} (not yet given) has this text "
                        f"({rec['text'][:40]!r}...)")
    return d


def _write_cache(out: Path, files: list[str], shards, T: int, values: np.ndarray, storage_dtype: str) -> None:
    """The cache format of cache.py, built beside `out` and swapped in whole."""
    from megaslm.reference.cache import (CHUNK_DIR, STORAGE_DTYPES, cache_meta, chunk_file, chunk_rows, swap_in,
                                         write_chunk, write_json_synced)
    from megaslm.reference.score_docs import ALIGNMENT

    n_seq = len(values)
    C = max(1, (1 << 20) // T)
    key = hashlib.sha256(json.dumps([shards.fingerprint, T, [os.path.abspath(f) for f in files]]).encode())
    work = out.parent / f"{out.name}.tmp-{key.hexdigest()[:16]}"
    (work / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    values = values.astype(STORAGE_DTYPES[storage_dtype])
    for c in range(-(-n_seq // C)):
        lo, hi = chunk_rows(c, C, n_seq)
        write_chunk(chunk_file(work, c), values[lo:hi])
    meta = cache_meta(seq_len=T, num_sequences=n_seq, chunk_sequences=C, storage_dtype=storage_dtype,
                      compute_dtype="imported", shards=shards, world_size=1,
                      reference={"path": None, "fingerprint": None, "placement": "imported", "alignment": ALIGNMENT,
                                 "imported": [os.path.abspath(f) for f in files]})
    write_json_synced(work / "meta.json", meta)
    swap_in(work, out)


def _text_index(layout, shards, starts) -> dict[bytes, list[int]]:
    from megaslm.reference.score_docs import document_window

    index: dict[bytes, list[int]] = {}
    for d in range(len(starts)):
        wb = layout.segments(document_window(shards, starts, d)[1])[3]
        index.setdefault(hashlib.sha256(wb).digest(), []).append(d)
    return index


def _take(index: dict, text: bytes, seen: dict) -> int | None:
    """The first document with this text not given yet (duplicates are matched in order)."""
    for d in index.get(hashlib.sha256(text).digest(), []):
        if d not in seen:
            return d
    return None


def _first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))[0]
    return int(diff[0]) if len(diff) else n
