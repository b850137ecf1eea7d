"""The text an analysis looks at: documents from a shard directory or from text files, and windows over them.

Documents: the first N documents of each source (each input file of the shards' `sources`, or each text file
given), so a mixed corpus shows all of its sources. A document's token ids exclude the EOS that ends it in the
shards. It is scored as in training, where it follows the previous document's EOS: the stream is
[EOS] + ids, cut into windows of at most T + 1 tokens at stride T, so every token of the document gets a loss and
none is scored twice. `pieces` gives the text of each token so that the pieces concatenate to the decoded text.

A held-out token stream (for `analyze dynamics`): the first tokens of the shards, or of the text files'
documents each followed by EOS, as `prepare` writes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaslm.data.shards import META_FILE, ShardSet, check_compatible
from megaslm.data.tokenizer import Tokenizer
from megaslm.errors import UserError


@dataclass
class Document:
    index: int  # order in the analysis
    source: int  # index into the source names
    ids: np.ndarray  # token ids, without EOS


def is_shard_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


def open_shards(path: str, vocab_size: int, tokenizer: Tokenizer | None, desc: str) -> ShardSet:
    """The shard set, refused (as training refuses it) unless it was tokenized for this model."""
    shards = ShardSet(path)
    check_compatible(shards, vocab_size, tokenizer.fingerprint if tokenizer else None, desc)
    return shards


def _shard_documents(shards: ShardSet, per_source: int) -> list[tuple[int, int, int]]:
    """(global start, end, source) of the first `per_source` documents of every source, in stream order.
    Reads the per-file document index (docs_XXXXX.npy, see megaslm/data/shards.py)."""
    taken = [0] * len(shards.sources)
    out = []
    base = 0
    for entry in shards.meta["shards"]:
        n = entry["num_tokens"]
        docs = np.load(os.path.join(shards.path, entry["docs_file"]), mmap_mode="r")
        starts, sources = np.asarray(docs[0]), np.asarray(docs[1])
        ends = np.append(starts[1:], n)
        for s, e, src in zip(starts.tolist(), ends.tolist(), sources.tolist()):
            if taken[src] < per_source:
                taken[src] += 1
                out.append((base + s, base + e - 1, src))  # e - 1: drop the EOS
        base += n
        if all(t >= per_source for t in taken):
            break
    return out


def shard_documents(shards: ShardSet, per_source: int) -> tuple[list[Document], list[str]]:
    spans = _shard_documents(shards, per_source)
    docs = [Document(i, src, shards.read(a, b).astype(np.int64)) for i, (a, b, src) in enumerate(spans)]
    return [d for d in docs if len(d.ids)], [Path(s).name for s in shards.sources]


def text_documents(paths: list[str], tokenizer: Tokenizer, per_source: int,
                   text_field: str) -> tuple[list[Document], list[str]]:
    from megaslm.data.readers import expand_inputs, iter_text_batches

    files = expand_inputs(paths)
    docs: list[Document] = []
    for src, path in enumerate(files):
        texts: list[str] = []
        for batch in iter_text_batches(path, text_field, batch_size=max(1, min(per_source, 1000))):
            texts += batch[:per_source - len(texts)]
            if len(texts) >= per_source:
                break
        for ids in tokenizer.encode_batch(texts):
            if ids:
                docs.append(Document(len(docs), src, np.asarray(ids, dtype=np.int64)))
    return docs, [Path(f).name for f in files]


def read_documents(paths: list[str], tokenizer: Tokenizer | None, vocab_size: int, per_source: int,
                   text_field: str, desc: str) -> tuple[list[Document], list[str]]:
    """Documents and source names from one shard directory, or from text files/directories."""
    if per_source < 1:
        raise UserError(f"--docs must be >= 1, got {per_source}")
    if len(paths) == 1 and is_shard_dir(paths[0]):
        return shard_documents(open_shards(paths[0], vocab_size, tokenizer, desc), per_source)
    if tokenizer is None:
        raise UserError(f"--data {' '.join(paths)} is text, but model {desc} has no tokenizer to tokenize it "
                        "(give a shard directory, or a model directory that holds its tokenizer)")
    docs, names = text_documents(paths, tokenizer, per_source, text_field)
    if not docs:
        raise UserError(f"--data {' '.join(paths)} holds no non-empty documents")
    return docs, names


def document_windows(ids: np.ndarray, eos_id: int, seq_len: int) -> list[np.ndarray]:
    """Windows of [EOS] + ids: at most seq_len + 1 tokens, stride seq_len; their losses concatenate to one
    loss per document token."""
    stream = np.concatenate([[eos_id], ids]).astype(np.int64)
    return [stream[s:s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]


def token_stream(paths: list[str], tokenizer: Tokenizer | None, vocab_size: int, n_tokens: int, text_field: str,
                 desc: str) -> np.ndarray:
    """The first n_tokens + 1 tokens (fewer if the data is shorter) of the shards or of the text's documents
    each followed by EOS."""
    if len(paths) == 1 and is_shard_dir(paths[0]):
        shards = open_shards(paths[0], vocab_size, tokenizer, desc)
        return shards.read(0, min(n_tokens + 1, shards.num_tokens)).astype(np.int64)
    if tokenizer is None:
        raise UserError(f"--data {' '.join(paths)} is text, but run {desc} records no tokenizer; give a shard "
                        "directory")
    from megaslm.data.readers import expand_inputs, iter_text_batches

    out: list[int] = []
    for path in expand_inputs(paths):
        for batch in iter_text_batches(path, text_field, batch_size=64):
            for ids in tokenizer.encode_batch(batch):
                out += list(ids) + [tokenizer.eos_id]
            if len(out) > n_tokens:
                return np.asarray(out[:n_tokens + 1], dtype=np.int64)
    return np.asarray(out, dtype=np.int64)


def pieces(tokenizer: Tokenizer | None, ids: np.ndarray, context: int = 32) -> list[str]:
    """The text of each token, such that the pieces concatenate to the decoded document.

    Each token is decoded after up to `context` tokens before it (so a leading space is kept, unlike decoding
    it alone). Bytes of one character split over byte-fallback tokens show on the token that completes it."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    out: list[str] = []
    for i, tok in enumerate(ids):
        ctx = ids[max(0, i - context):i]
        before = tokenizer.decode(ctx) if ctx else ""
        after = tokenizer.decode(ctx + [tok])
        common = len(os.path.commonprefix([before, after]))
        _drop_tail(out, len(before) - common)  # trailing partial bytes rewritten into a whole character
        out.append(after[common:])
    return out


def _drop_tail(out: list[str], n: int) -> None:
    j = len(out) - 1
    while n > 0 and j >= 0:
        cut = min(n, len(out[j]))
        out[j] = out[j][:len(out[j]) - cut]
        n -= cut
        j -= 1
