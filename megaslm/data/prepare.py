"""`prepare`: local text files -> token shards (format in `megaslm.data.shards`).

Inputs are read as `megaslm.data.readers` describes (txt: blank-line-separated documents; jsonl/json:
`text_field` per record; parquet: column `text_field`; `.gz` text; a directory: its supported files, sorted).
With `sft_fields` (prompt/response or messages columns, see `megaslm.data.sft`) documents are built from those
fields and the shards carry a loss mask. Text that is not UTF-8 is reported and skipped or refused
(`on_bad_utf8`); meta.json records `bad_utf8_documents` (count) and `bad_utf8_examples` (the first 20 places).
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

from megaslm.data.readers import BAD_UTF8_POLICIES, BadInput, expand_inputs, iter_column_batches, iter_text_batches
from megaslm.data.sft import record_segments
from megaslm.data.shards import ShardWriter
from megaslm.data.tokenizer import Tokenizer, load_tokenizer
from megaslm.errors import UserError

_worker_tok: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _worker_tok
    _worker_tok = tok
    if hasattr(tok, "num_threads"):  # one thread per worker: the pool already spreads over the cores
        tok.num_threads = 1


def _encode(task: tuple[int, list], tok: Tokenizer | None = None):
    """Tokenize one batch; returns (source index, concatenated ids, per-document lengths, loss mask or None).
    Flat arrays pickle far faster than a list of lists. A batch is texts, or segment lists (SFT)."""
    source, docs = task
    tok = tok or _worker_tok
    if docs and isinstance(docs[0], str):
        ids, mask = tok.encode_batch(docs), None
    else:  # each segment tokenized on its own, so the mask boundary is exact
        seg_ids = tok.encode_batch([text for d in docs for text, _ in d])
        flags = [loss for d in docs for _, loss in d]
        it = iter(zip(seg_ids, flags))
        ids, masks = [], []
        for d in docs:
            parts = [next(it) for _ in d]
            ids.append([t for p, _ in parts for t in p])
            masks.append([loss for p, loss in parts for _ in p])
        mask = np.fromiter(itertools.chain.from_iterable(masks), dtype=np.uint8)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return source, flat, lengths, mask


def _tasks(files: list[str], text_field: str, batch_docs: int, bad: BadInput,
           sft_fields: dict[str, str] | None) -> Iterator[tuple[int, list]]:
    for i, path in enumerate(files):
        if sft_fields:
            for cols in iter_column_batches(path, list(sft_fields.values()), batch_docs, bad):
                if docs := record_segments(cols, sft_fields, f"input {path}"):
                    yield i, docs
        else:
            yield from ((i, batch) for batch in iter_text_batches(path, text_field, batch_docs, bad))


def sft_fields_from(prompt_field: str | None, response_field: str | None,
                    messages_field: str | None) -> dict[str, str] | None:
    """The column map for SFT records, or None for plain text; a half-given pair is a UserError."""
    if messages_field and (prompt_field or response_field):
        raise UserError("give either --messages-field or --prompt-field/--response-field, not both")
    if messages_field:
        return {"messages": messages_field}
    if bool(prompt_field) != bool(response_field):
        raise UserError("--prompt-field and --response-field go together (got only one)")
    return {"prompt": prompt_field, "response": response_field} if prompt_field else None


def prepare(inputs: list[str], tokenizer: str | Tokenizer, out_dir: str, text_field: str = "text",
            num_proc: int = 1, max_tokens_per_shard: int = 2**27, batch_docs: int = 512,
            log: Callable[[str], None] | None = None, sft_fields: dict[str, str] | None = None,
            on_bad_utf8: str = "error") -> dict:
    """Tokenize `inputs` with `tokenizer` (a spec for `load_tokenizer`, or a Tokenizer) into a shard set at
    `out_dir`, appending EOS to every document and recording each document's source file. Returns meta.

    The new set replaces an old one at `out_dir` only once it is complete; on any error (or a kill) the
    old set stays as it was."""
    files = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if int(num_proc) < 1:
        raise UserError(f"num_proc must be >= 1, got {num_proc}")
    if on_bad_utf8 not in BAD_UTF8_POLICIES:
        raise UserError(f"--on-bad-utf8 must be one of {', '.join(BAD_UTF8_POLICIES)}, got {on_bad_utf8!r}")
    bad = BadInput(on_bad_utf8)
    sources = [os.path.abspath(f) for f in files]
    with ShardWriter(out_dir, tok.vocab_size, tok.fingerprint, tok.eos_id, sources,
                     max_tokens_per_shard=max_tokens_per_shard, loss_mask=bool(sft_fields)) as writer:
        def write(result) -> None:
            source, flat, lengths, mask = result
            writer.add_documents(flat, lengths, source, mask)

        tasks = _tasks(files, text_field, batch_docs, bad, sft_fields)
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
        # The tokenizer's path beside its fingerprint: the run's in-loop eval and export use it when the config
        # names none (recorded_tokenizer checks the fingerprint again before using it).
        meta = writer.close({"bad_utf8_documents": len(bad.found), "bad_utf8_examples": bad.found[:20],
                             "tokenizer": os.path.abspath(tok.path)})
    if log is not None:
        for where in bad.found:
            log(f"skipped (not valid UTF-8): {where}")
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
