"""`prepare`: local text files -> token shards (format in `megaslm.data.shards`).

Inputs are read as `megaslm.data.readers` describes (txt: blank-line-separated documents; jsonl/json:
`text_field` per record; parquet: column `text_field`; `.gz` text; a directory: its supported files, sorted).
Documents are read a batch at a time in the main process, tokenized by `num_proc` worker processes, and
written in input order, so the shards are byte-identical for any `num_proc`. At most 2 * num_proc batches are
in flight, so memory is bounded by a few batches plus the writer's buffer, never the corpus.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from megaslm.data.readers import expand_inputs, iter_text_batches
from megaslm.data.shards import ShardWriter
from megaslm.data.tokenizer import Tokenizer, load_tokenizer
from megaslm.errors import UserError

_worker_tok: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tok
    _worker_tok = tok
    if hasattr(tok, "num_threads"):  # one thread per worker: the pool already spreads over the cores
        tok.num_threads = 1


def _encode(task: tuple[int, list[str]], tok: Tokenizer | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Tokenize one batch; returns (source index, concatenated ids, per-document lengths). Two flat arrays
    pickle far faster than a list of lists."""
    source, texts = task
    ids = (tok or _worker_tok).encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return source, flat, lengths


def _tasks(files: list[str], text_field: str, batch_docs: int) -> Iterator[tuple[int, list[str]]]:
    for i, path in enumerate(files):
        for batch in iter_text_batches(path, text_field, batch_size=batch_docs):
            yield i, batch


def prepare(inputs: list[str], tokenizer: str | Tokenizer, out_dir: str, text_field: str = "text",
            num_proc: int = 1, max_tokens_per_shard: int = 2**27, batch_docs: int = 512,
            log: Callable[[str], None] | None = None) -> dict:
    """Tokenize `inputs` with `tokenizer` (a spec for `load_tokenizer`, or a Tokenizer) into a shard set at
    `out_dir`, appending EOS to every document and recording each document's source file. Returns meta.

    The new set replaces an old one at `out_dir` only once it is complete; on any error (or a kill) the
    old set stays as it was."""
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if int(num_proc) < 1:
        raise UserError(f"num_proc must be >= 1, got {num_proc}")
    sources = [os.path.abspath(f) for f in files]
    with ShardWriter(out_dir, tok.vocab_size, tok.fingerprint, tok.eos_id, sources,
                     max_tokens_per_shard=max_tokens_per_shard) as writer:
        def write(result) -> None:
            source, flat, lengths = result
            writer.add_documents(flat, lengths, source)

        tasks = _tasks(files, text_field, batch_docs)
        if num_proc == 1:
            for task in tasks:
                write(_encode(task, tok))
        else:
            # fork, so scripts without a __main__ guard work; the pool starts before this process reads any
            # input (the task generator is lazy), i.e. before pyarrow/datasets start their threads.
            ctx = mp.get_context("fork")
            with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tok,)) as pool:
                pending: deque = deque()
                for task in tasks:
                    pending.append(pool.apply_async(_encode, (task,)))
                    if len(pending) >= 2 * num_proc:
                        write(pending.popleft().get())
                while pending:
                    write(pending.popleft().get())
        if writer.num_documents == 0:
            raise UserError(f"no documents found in {', '.join(files)} (all empty?)")
        meta = writer.close()
    if log is not None:
        for path, n_docs, n_tok in zip(sources, meta["source_documents"], meta["source_tokens"]):
            log(f"{path}: {n_docs} documents, {n_tok} tokens")
        log(f"wrote {meta['num_tokens']} tokens, {meta['num_documents']} documents, {len(meta['shards'])} "
            f"file(s) to {out_dir}")
    return meta


def main(argv: list[str] | None = None) -> None:  # python -m megaslm.data.prepare ... (the CLI wraps prepare)
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--num-proc", type=int, default=1)
    a = p.parse_args(argv)
    try:
        prepare(a.inputs, a.tokenizer, a.out, a.text_field, a.num_proc, log=lambda s: print(s, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
