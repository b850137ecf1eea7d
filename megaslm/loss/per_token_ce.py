"""Per-token cross-entropy of an LM head, chunked over tokens, optionally vocab-parallel.

`per_token_ce(hidden, weight, labels)` equals
`F.cross_entropy(hidden @ weight.T, labels, reduction="none", ignore_index=...)` in float32, but never holds the
full [tokens, vocab] logits: forward keeps only each token's logsumexp, and backward recomputes the logits one
chunk of tokens at a time. With `tp_group`, `weight` is this rank's slice of the vocabulary
(`torch.tensor_split(full_weight, G, dim=0)[rank]`) and the softmax statistics are combined with all-reduces of a
few floats per token (Megatron's vocab-parallel cross-entropy), so the logits are never gathered either.

Backward only works on the tokens whose incoming gradient is nonzero. Under selective language modeling an
unselected token (and an ignored label) has gradient exactly 0: its logits are not recomputed, its row of the
hidden-state gradient is 0 and it adds nothing to the weight gradient. The tokens that carry a gradient are
compacted and re-chunked, so the backward matmuls shrink with the selected fraction; the result equals full-logits
autograd on the same mask (up to float summation order).

Memory for speed (`keep_bytes`): the fp32 softmax of the first chunks, up to `keep_bytes` in all, is kept from
forward to backward, and those chunks skip the logits recompute. 0 (the default) keeps nothing.

Chunk size (`default_chunk_tokens`): a chunk's fp32 logits are about the size of the hidden states (Liger-Kernel's
rule), but never fewer than MIN_CHUNK_TOKENS tokens, below which the matmul re-reads the whole weight for too little
work (docs/loss_head.md has the measurements).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Smallest default chunk: below it the logits matmul is bound by streaming the weight (docs/loss_head.md).
MIN_CHUNK_TOKENS = 64


def default_chunk_tokens(n_tokens: int, hidden_size: int, vocab_per_rank: int) -> int:
    """Tokens per chunk such that a chunk's logits hold about as many values as the hidden states."""
    balanced = -(-n_tokens * hidden_size // max(1, vocab_per_rank))
    return max(1, min(n_tokens, max(MIN_CHUNK_TOKENS, balanced)))


def per_token_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    keep_bytes: int = 0,
) -> torch.Tensor:
    """Float32 cross-entropy of every position, shaped like `labels`.

    hidden: [..., H] final hidden states (any float dtype); weight: [V_local, H] LM-head rows held by this rank;
    labels: [...] long, already aligned with hidden's positions (no shifting here). Positions whose label is
    `ignore_index` give exactly 0 loss and 0 gradient. Differentiable w.r.t. hidden and weight.

    chunk_size: tokens per chunk (None: `default_chunk_tokens`).
    tp_group: vocab-parallel mode. Rank r of the group passes `torch.tensor_split(full_weight, G, dim=0)[r]` and
    gets the full-weight call's losses on every rank. In backward, hidden.grad is summed over the group (so it
    equals the full-weight call's on every rank) and weight.grad holds the shard's rows of the full gradient.
    Every rank of the group must call this with the same hidden shape, labels and chunk_size.
    keep_bytes: budget for fp32 softmax chunks kept from forward to backward (skipping their recompute); only
    used when a gradient will be taken.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"per_token_ce: hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"per_token_ce: weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError("per_token_ce: hidden and weight must be floating point")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_token_ce: chunk_size must be >= 1, got {chunk_size}")
    if keep_bytes < 0:
        raise ValueError(f"per_token_ce: keep_bytes must be >= 0, got {keep_bytes}")

    if tp_group is not None:
        vocab_start, vocab_size = _vocab_range(weight.shape[0], tp_group, weight.device)
    else:
        vocab_start, vocab_size = 0, weight.shape[0]
    # The chunk size fixes the number of collectives, so it must not depend on this rank's shard size.
    if chunk_size is None:
        per_rank_rows = -(-vocab_size // (dist.get_world_size(tp_group) if tp_group is not None else 1))
        chunk_size = default_chunk_tokens(labels.numel(), hidden.shape[-1], per_rank_rows)
    # Kept chunks only pay off when backward runs; the reference model's no-grad call never keeps.
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep_chunks = 0
    if grad_wanted and weight.shape[0] > 0:
        keep_chunks = keep_bytes // (4 * chunk_size * weight.shape[0])

    labels_flat = labels.reshape(-1)
    valid = labels_flat != ignore_index
    # A label outside the vocabulary would silently read another token's logit under vocab sharding.
    bad = valid & ((labels_flat < 0) | (labels_flat >= vocab_size))
    if bool(bad.any()):  # host sync: once per call, to raise before any collective
        raise ValueError(
            f"per_token_ce: label {int(labels_flat[bad][0])} outside the vocabulary [0, {vocab_size}) "
            "(tokenizer and model vocabulary differ?)"
        )
    loss = _ChunkedLinearCE.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels_flat, valid, chunk_size, tp_group, vocab_start,
        keep_chunks,
    )
    return loss.view(labels.shape)


def _vocab_range(local_rows: int, group: dist.ProcessGroup, device: torch.device) -> tuple[int, int]:
    """(first vocab id held by this rank, full vocab size), from one all-reduce of every rank's row count."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_rows
    dist.all_reduce(sizes, group=group)
    sizes = sizes.tolist()
    return sum(sizes[:rank]), sum(sizes)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Matmul in the weight's dtype (as nn.Linear would), softmax statistics in fp32.
    return (h.to(weight.dtype) @ weight.t()).float()


def _local_targets(labels: torch.Tensor, valid: torch.Tensor, vocab_start: int, local_rows: int):
    """(column of the label in this shard, mask of tokens whose label lives in this shard)."""
    col = labels - vocab_start
    here = valid & (col >= 0) & (col < local_rows)
    return torch.where(here, col, torch.zeros_like(col)), here


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk_size, tp_group, vocab_start, keep_chunks):
        n, rows = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kept = []
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            logits = _chunk_logits(hidden[s:e], weight)
            col, here = _local_targets(labels[s:e], valid[s:e], vocab_start, rows)
            if rows > 0:
                tgt = torch.where(here, logits.gather(1, col[:, None]).squeeze(1), 0.0)
                row_max = logits.amax(dim=1)
            else:  # an empty shard (vocabulary smaller than the group) contributes nothing
                tgt = torch.zeros(e - s, device=hidden.device)
                row_max = torch.full((e - s,), float("-inf"), device=hidden.device)
            if tp_group is not None:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            # In place: exp(logits - max) reuses the chunk's buffer.
            sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=1)
            if tp_group is not None:
                # One all-reduce for both sums: the owner rank holds the target logit, the others hold 0.
                both = torch.stack([sum_exp, tgt])
                dist.all_reduce(both, group=tp_group)
                sum_exp, tgt = both[0], both[1]
            lse[s:e] = sum_exp.log() + row_max
            target[s:e] = tgt
            if len(kept) < keep_chunks:
                kept.append(logits.div_(sum_exp[:, None]))  # the softmax itself: backward needs nothing else
            del logits  # before the next chunk's logits exist, not after
        loss = torch.where(valid, lse - target, 0.0)
        ctx.save_for_backward(hidden, weight, labels, valid, lse)
        ctx.chunk_size, ctx.tp_group, ctx.vocab_start, ctx.kept = chunk_size, tp_group, vocab_start, kept
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, labels, valid, lse = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = _HeadGrad(hidden, weight, need_h, need_w)
        # d loss_i / d logit_ij = softmax_ij - [j == label_i], scaled by the incoming gradient; 0 when ignored.
        scale = torch.where(valid, grad_loss.float(), 0.0)
        if weight.shape[0] > 0 and (need_h or need_w):
            n, chunk = hidden.shape[0], ctx.chunk_size
            live = scale != 0
            n_kept = min(n, len(kept) * chunk)
            # Kept chunks: their softmax is at hand; only the rows that carry a gradient enter the matmuls.
            for i, probs in enumerate(kept):
                s = i * chunk
                rows = live[s:s + probs.shape[0]].nonzero().squeeze(1)  # host sync: sizes the matmuls
                if rows.numel():
                    d = probs if rows.numel() == probs.shape[0] else probs.index_select(0, rows)
                    grad.add(d, _positions(rows, s), labels, valid, scale, ctx.vocab_start)
                del probs
            kept.clear()
            # The rest: compact the tokens with a gradient, re-chunk them, recompute their logits.
            idx = live[n_kept:].nonzero().squeeze(1) + n_kept  # host sync: sizes the chunks
            dense = idx.numel() == n - n_kept
            for s in range(0, idx.numel(), chunk):
                pos = slice(n_kept + s, n_kept + min(idx.numel(), s + chunk)) if dense else idx[s:s + chunk]
                d = _chunk_logits(hidden[pos], weight).sub_(lse[pos, None]).exp_()  # softmax, from the saved lse
                grad.add(d, pos, labels, valid, scale, ctx.vocab_start)
                del d  # before the next chunk's logits exist, not after
        grad_h, grad_w = grad.result()
        if need_h and ctx.tp_group is not None:
            # Each rank holds the contribution of its own vocab rows; the head's input is replicated.
            dist.all_reduce(grad_h, group=ctx.tp_group)
        return grad_h, grad_w, None, None, None, None, None, None


def _positions(rows: torch.Tensor, start: int):
    """Row indices as a slice when they are the contiguous range [start, start + len) (no gather copy)."""
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) == n - 1:
        return slice(start + int(rows[0]), start + int(rows[0]) + n)
    return rows + start


class _HeadGrad:
    """Accumulates the hidden-state and weight gradients of the head, one block of softmax rows at a time.

    grad_h rows of tokens never added stay 0. grad_w sums in fp32; a low-precision weight's block products go
    through one reused buffer, except for a lone block whose product already is the gradient.
    """

    def __init__(self, hidden, weight, need_h, need_w):
        self.hidden, self.weight, self.need_w = hidden, weight, need_w
        self.low_precision = weight.dtype != torch.float32
        self.grad_h = torch.zeros_like(hidden) if need_h else None
        self.acc_w = self.block_w = self.first_w = None

    def add(self, d, pos, labels, valid, scale, vocab_start):
        """d: fp32 softmax rows of the tokens at `pos` (a slice or index tensor); overwritten."""
        w = self.weight
        col, here = _local_targets(labels[pos], valid[pos], vocab_start, w.shape[0])
        d.scatter_add_(1, col[:, None], -here[:, None].float())
        d.mul_(scale[pos, None])
        if self.low_precision:
            d = d.to(w.dtype)  # the fp32 buffer goes; matmuls run in the weight's dtype
        if self.grad_h is not None:
            self.grad_h[pos] = (d @ w).to(self.hidden.dtype)
        if self.need_w:
            h = self.hidden[pos].to(w.dtype)
            if not self.low_precision:
                if self.acc_w is None:
                    self.acc_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                self.acc_w.addmm_(d.t(), h)
            elif self.first_w is None and self.acc_w is None:
                self.first_w = d.t() @ h
            else:
                if self.acc_w is None:  # a second block: start the fp32 sum from the first
                    self.acc_w = self.first_w.float()
                    self.block_w, self.first_w = torch.empty_like(w), None
                torch.matmul(d.t(), h, out=self.block_w)
                self.acc_w += self.block_w

    def result(self):
        grad_w = None
        if self.need_w:
            if self.first_w is not None:
                grad_w = self.first_w
            elif self.acc_w is not None:
                grad_w = self.acc_w.to(self.weight.dtype)
            else:
                grad_w = torch.zeros_like(self.weight)
        return self.grad_h, grad_w
