"""`megaslm score` with a reference of another tokenizer: documents scored whole, losses carried onto the cache.

The cache holds, for every stream position p, the loss of predicting token p (cache.py). With another
tokenizer the reference scores each document on its own, in its own tokens (xtok.py's `document_window`):
its sequence is [EOS] + the document's text + [EOS] (the EOS before it stands for the previous document's end,
which the trained model sees too), cut into blocks of train.seq_len + 1 tokens that overlap by one, as the
loader cuts the trained stream: block k predicts sequence positions k*T+1 .. k*T+T from the block's tokens
before them (so the reference's context is at most train.seq_len of its own tokens, restarting at a block).
Short blocks (a document's last) share a row of T positions (`pack`), position ids restarting at each, so the
forward computes no padding.
The losses are carried onto the document's tokens by bytes (align.py) and written at their stream positions.
`imported.py` aligns log-probabilities from any engine the same way, so an engine that scores the same blocks
(`bench/logprobs_transformers.py --block-tokens T`) gives the same cache.
"""

from __future__ import annotations

import math

import numpy as np

ALIGNMENT = "bytes-v1"  # recorded in the cache's meta: how another tokenizer's losses were carried over


def document_starts(shards) -> np.ndarray:
    """int64: the stream offset of every document, ascending."""
    parts = [np.asarray(shards._doc_index(i)[0], np.int64) + int(shards._starts[i])
             for i in range(len(shards.meta["shards"]))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def document_window(shards, starts: np.ndarray, d: int) -> tuple[int, np.ndarray]:
    """(stream offset of document d, [EOS] + its tokens, its own EOS last)."""
    s = int(starts[d])
    e = int(starts[d + 1]) if d + 1 < len(starts) else shards.num_tokens
    return s, np.concatenate([[shards.eos_id], shards.read(s, e).astype(np.int64)])


def blocks(ref_ids: list[int], T: int) -> list[tuple[int, list[int]]]:
    """(first predicted position, the block's tokens): block k = ref_ids[k*T : k*T + T + 1]."""
    return [(k * T + 1, ref_ids[k * T:k * T + T + 1]) for k in range(max(1, math.ceil((len(ref_ids) - 1) / T)))]


def pack(items: list[tuple], T: int) -> list[list[tuple]]:
    """Blocks (i, first, block) into rows of T input positions, in order, each placed at an offset `at` (the row's
    position ids restart there: transformers then attends within each block only, its packed-sequence path)."""
    rows, row, used = [], [], 0
    for i, first, blk in items:
        n = len(blk) - 1
        if used + n > T and row:
            rows.append(row)
            row, used = [], 0
        row.append((i, first, blk, used))
        used += n
    return rows + ([row] if row else [])


def chunk_documents(job, chunk: int, starts: np.ndarray) -> range:
    """The documents whose tokens include a label of `chunk` (stream positions lo*T+1 .. hi*T)."""
    lo, hi = job.rows(chunk)
    p0, p1 = lo * job.T + 1, hi * job.T  # inclusive
    return range(int(np.searchsorted(starts, p0, side="right")) - 1, int(np.searchsorted(starts, p1, side="right")))


def score_chunk(job, chunk: int | None, run, reference, pair, starts: np.ndarray, tick=lambda frac: None
                ) -> np.ndarray | None:
    """The carried losses of `chunk` ([rows, T]); every rank runs as many forwards as the busiest (ZeRO-3).
    `tick(fraction of the forwards done)` before each forward (the progress line)."""
    import torch
    import torch.distributed as dist

    T, B = job.T, job.cfg.train.micro_batch_size
    docs = []
    if chunk is not None:
        docs = [document_window(job.shards, starts, d) for d in chunk_documents(job, chunk, starts)]
    plans = pair.plan([w for _, w in docs])
    rows = pack([(i, first, blk) for i, p in enumerate(plans) for first, blk in blocks(p.ref_ids, T)], T)
    n_micro = torch.tensor([math.ceil(len(rows) / B)], device=run.device)
    dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)  # sync point: the same number of forwards on every rank
    n_forwards = int(n_micro.item())
    ref_losses = [np.zeros(len(p.ref_ids), np.float64) for p in plans]
    for m in range(n_forwards):
        tick(m / n_forwards)
        part = rows[m * B:(m + 1) * B]
        ids = np.zeros((max(1, len(part)), T), np.int64)
        labels = np.full((max(1, len(part)), T), -100, np.int64)
        pos = np.zeros((max(1, len(part)), T), np.int64)
        for r, row in enumerate(part):
            for _, _, blk, at in row:
                n = len(blk) - 1
                ids[r, at:at + n], labels[r, at:at + n], pos[r, at:at + n] = blk[:-1], blk[1:], np.arange(n)
        dev = run.device
        v = reference.losses(torch.from_numpy(ids).to(dev), torch.from_numpy(labels).to(dev),
                             torch.from_numpy(pos).to(dev)).float().cpu().numpy()
        for r, row in enumerate(part):
            for i, first, blk, at in row:
                ref_losses[i][first:first + len(blk) - 1] = v[r, at:at + len(blk) - 1]
    if chunk is None:
        return None
    lo, hi = job.rows(chunk)
    p0, n = lo * T + 1, (hi - lo) * T
    flat = np.full(n, np.nan, np.float64)
    for (s, w), p, losses in zip(docs, plans, ref_losses):
        carried = pair.carry(p, losses, len(w))[1:]  # stream positions s .. s + len(w) - 2
        a, b = max(s, p0), min(s + len(w) - 1, p0 + n)
        flat[a - p0:b - p0] = carried[a - s:b - s]
    if not np.isfinite(flat).all():
        from megaslm.errors import UserError

        raise UserError(f"reference model {job.ref_path} gave a non-finite loss in chunk {chunk} of "
                        f"{job.shards.path}; try model.dtype=fp32")
    return flat.reshape(hi - lo, T).astype(job.np_dtype)
