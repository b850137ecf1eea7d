"""Per-token cross-entropy of an LM head, chunked over tokens, optionally vocab-parallel.

`per_token_ce(hidden, weight, labels)` equals
`F.cross_entropy(hidden @ weight.T, labels, reduction="none", ignore_index=...)` in float32, but never holds the
full [tokens, vocab] logits: forward keeps only each token's logsumexp, and backward recomputes the logits one
chunk of tokens at a time. With `tp_group`, `weight` is this rank's slice of the vocabulary
(`torch.tensor_split(full_weight, G, dim=0)[rank]`) and the softmax statistics are combined with all-reduces of a
few floats per token (Megatron's vocab-parallel cross-entropy), so the logits are never gathered either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Default chunk: keep one chunk's fp32 logits near this many bytes (2048 tokens at a 32k vocabulary).
DEFAULT_CHUNK_BYTES = 256 * 2**20


def per_token_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Float32 cross-entropy of every position, shaped like `labels`.

    hidden: [..., H] final hidden states (any float dtype); weight: [V_local, H] LM-head rows held by this rank;
    labels: [...] long, already aligned with hidden's positions (no shifting here). Positions whose label is
    `ignore_index` give exactly 0 loss and 0 gradient. Differentiable w.r.t. hidden and weight.

    chunk_size: tokens per chunk (None: about 256 MiB of fp32 logits per chunk).
    tp_group: vocab-parallel mode. Rank r of the group passes `torch.tensor_split(full_weight, G, dim=0)[r]` and
    gets the full-weight call's losses on every rank. In backward, hidden.grad is summed over the group (so it
    equals the full-weight call's on every rank) and weight.grad holds the shard's rows of the full gradient.
    Every rank of the group must call this with the same hidden shape, labels and chunk_size.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"per_token_ce: hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"per_token_ce: weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError("per_token_ce: hidden and weight must be floating point")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_token_ce: chunk_size must be >= 1, got {chunk_size}")

    if tp_group is not None:
        vocab_start, vocab_size = _vocab_range(weight.shape[0], tp_group, weight.device)
    else:
        vocab_start, vocab_size = 0, weight.shape[0]
    # The chunk size fixes the number of collectives, so it must not depend on this rank's shard size.
    if chunk_size is None:
        per_rank_rows = -(-vocab_size // (dist.get_world_size(tp_group) if tp_group is not None else 1))
        chunk_size = max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, per_rank_rows)))

    labels_flat = labels.reshape(-1)
    valid = labels_flat != ignore_index
    # A label outside the vocabulary would silently read another token's logit under vocab sharding.
    bad = valid & ((labels_flat < 0) | (labels_flat >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"per_token_ce: label {int(labels_flat[bad][0])} outside the vocabulary [0, {vocab_size}) "
            "(tokenizer and model vocabulary differ?)"
        )
    loss = _ChunkedLinearCE.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels_flat, valid, chunk_size, tp_group, vocab_start
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
    def forward(ctx, hidden, weight, labels, valid, chunk_size, tp_group, vocab_start):
        n, rows = hidden.shape[0], weight.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        target = torch.empty(n, dtype=torch.float32, device=hidden.device)
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
            del logits  # before the next chunk's logits exist, not after
        loss = torch.where(valid, lse - target, 0.0)
        ctx.save_for_backward(hidden, weight, labels, valid, lse)
        ctx.chunk_size, ctx.tp_group, ctx.vocab_start = chunk_size, tp_group, vocab_start
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, labels, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, rows, chunk = hidden.shape[0], weight.shape[0], ctx.chunk_size
        low_precision, single = weight.dtype != torch.float32, n <= chunk
        # Every row of grad_h is written below, unless this rank holds no vocabulary rows at all.
        grad_h = (torch.zeros_like(hidden) if rows == 0 else torch.empty_like(hidden)) if need_h else None
        grad_w = None
        # grad_w accumulates in fp32 over chunks; a low-precision weight's chunk products go through one reused
        # buffer (with a single chunk the product already is the gradient).
        acc_w = None
        if need_w and not (low_precision and single):
            acc_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        chunk_gw = torch.empty_like(weight) if need_w and low_precision and not single else None
        # d loss_i / d logit_ij = softmax_ij - [j == label_i], scaled by the incoming gradient; 0 when ignored.
        scale = torch.where(valid, grad_loss.float(), 0.0)
        if rows > 0 and (need_h or need_w):
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                h = hidden[s:e]
                d = _chunk_logits(h, weight).sub_(lse[s:e, None]).exp_()  # softmax, from the saved lse
                col, here = _local_targets(labels[s:e], valid[s:e], ctx.vocab_start, rows)
                d.scatter_add_(1, col[:, None], -here[:, None].float())
                d.mul_(scale[s:e, None])
                if low_precision:
                    d = d.to(weight.dtype)  # the fp32 buffer goes; matmuls run in the weight's dtype
                if need_h:
                    grad_h[s:e] = (d @ weight).to(hidden.dtype)
                if need_w:
                    if not low_precision:
                        acc_w.addmm_(d.t(), h.float())
                    elif single:
                        grad_w = d.t() @ h.to(weight.dtype)
                    else:
                        torch.matmul(d.t(), h.to(weight.dtype), out=chunk_gw)
                        acc_w += chunk_gw
                del d  # before the next chunk's logits exist, not after
        if need_h and ctx.tp_group is not None:
            # Each rank holds the contribution of its own vocab rows; the head's input is replicated.
            dist.all_reduce(grad_h, group=ctx.tp_group)
        if need_w and grad_w is None:
            grad_w = acc_w.to(weight.dtype) if acc_w is not None else torch.zeros_like(weight)
        return grad_h, grad_w, None, None, None, None, None
