"""The fused loss head: per-token cross-entropy whose gradients are formed in the forward (3 head matmuls).

When the caller knows, before the forward, how the gradient reaching the per-token losses will be shaped, the
head does not need a backward of its own: CLM backpropagates `sum(loss_i * valid_i) * c` for a step scalar c
(the normaliser, DeepSpeed's 1/grad_accum, a loss scale), so the incoming gradient is `r * w_i` with the
per-token weights w known up front (the labelled tokens) and one scalar r that arrives with the backward.
The forward then computes, per token chunk, the logits of every vocabulary block (matmul 1), the softmax
statistics, and from the chunk's tiles the weighted softmax-minus-one-hot `d = w * (p - y)`, its hidden-state
gradient `d @ W` (matmul 2) and its weight gradient `d.T @ h` (matmul 3); the tiles are then dropped. Backward
only multiplies both gradients by r. Against the recompute path (per_token_ce) this saves the fourth matmul,
the recompute of the logits; it holds one chunk's fp32 tiles `[chunk, V_local]` at a time plus the two
gradients (the sizes of the hidden states and of the head's weight) from forward to backward.

The contract is checked without a host sync: r is fitted on the device as sum(g * w) / sum(w * w) over the
labelled tokens and, if the incoming gradient is not r * w within 1e-5 relative, both gradients are NaN (the
skip guard then refuses the step) instead of silently wrong. r == 0 (a step whose loss was zeroed) gives exact
zeros even when the losses were not finite.

Vocab-parallel (tp_group): as per_token_ce, with the max and sum-exp all-reduces per token chunk and the
hidden-state gradient summed over the group in backward. SLM's selection is known only after the forward, so
SLM keeps the recompute path with its selected-token backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaslm.loss import tiles

# Fused-path token chunk: its fp32 tiles [chunk, V_local] are held together (the softmax of a tile needs the
# log-sum-exp over every vocabulary block). Bounded by this budget, but never below FUSED_MIN_TOKENS tokens, under
# which the matmuls get thin and every chunk re-reads the weight and re-adds the fp32 weight gradient (CPU
# measurements in docs/loss_head.md).
FUSED_BUDGET_BYTES = 64 * 2**20
FUSED_MIN_TOKENS = 256
# Vocabulary rows per tile on this path (unless the caller sets them): per_token_ce.WIDE_VOCAB_BLOCK at least. A
# chunk's tiles are all held at once, so a larger block costs no memory and runs fewer, wider matmuls (CPU, 2048
# tokens in chunks of 512 x H 256 x V 32000: 128 rows 1.58 s, 512-2048 rows 1.40-1.42 s, full logits 1.76 s).


def fused_chunk_tokens(n_tokens: int, vocab_rows: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk of the fused head: as many as fit `budget_bytes` of fp32 [chunk, vocab_rows] tiles, at
    least FUSED_MIN_TOKENS, at most n_tokens; the chunks are then made equal."""
    budget = FUSED_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per_token = 4 * max(1, vocab_rows)
    chunk = max(FUSED_MIN_TOKENS, budget // per_token)
    chunks = max(1, -(-n_tokens // max(1, chunk)))
    return max(1, -(-n_tokens // chunks))


class FusedLinearCE(torch.autograd.Function):
    """apply(hidden [N, H], weight [V_local, H], labels [N], valid [N] bool, weights [N] fp32, chunk_size,
    vocab_block, tp_group, vocab_start) -> fp32 loss [N]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, weights, chunk_size, vocab_block, tp_group, vocab_start):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, rows = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        coeff = torch.where(valid, weights.float(), 0.0)
        loss = torch.zeros(n, device=dev)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = tiles.WeightGrad(weight, n > chunk_size) if need_w else None
        for s in range(0, n, chunk_size):
            t = slice(s, min(n, s + chunk_size))
            h = hidden[t].to(weight.dtype)
            m = torch.full((h.shape[0],), float("-inf"), device=dev)
            sum_exp = torch.zeros(h.shape[0], device=dev)
            target = torch.zeros(h.shape[0], device=dev)
            held = []  # (block start, exp(logits - running max at that block), that max)
            for v in range(0, rows, vocab_block):  # matmul 1: the logits, online softmax statistics
                logits = tiles.chunk_logits(h, weight[v:v + vocab_block])
                col, here = tiles.local_targets(labels[t], valid[t], vocab_start + v, logits.shape[1])
                target = torch.where(here, logits.gather(1, col[:, None]).squeeze(1), target)
                new_max = torch.maximum(m, logits.amax(dim=1))
                block_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                sum_exp = sum_exp * (m - new_max).exp() + block_sum
                m = new_max
                held.append((v, logits, new_max))
                del logits
            if tp_group is not None:  # as per_token_ce: the global max, then both sums rescaled to it
                glob_max = m.clone()
                dist.all_reduce(glob_max, op=dist.ReduceOp.MAX, group=tp_group)
                both = torch.stack([sum_exp * (m - glob_max).exp(), target])
                dist.all_reduce(both, group=tp_group)
                sum_exp, target, m = both[0], both[1], glob_max
            lse = sum_exp.log() + m
            loss[t] = torch.where(valid[t], lse - target, 0.0)
            if not (need_h or need_w):
                continue
            c = coeff[t]
            acc_h = grad_h[t] if need_h else None
            while held:  # matmuls 2 and 3 from the chunk's tiles; each tile goes as soon as it is used
                v, d, block_max = held.pop(0)
                w = weight[v:v + vocab_block]
                d.mul_((block_max - lse).exp_()[:, None])  # exp(logits - max) -> softmax
                col, here = tiles.local_targets(labels[t], valid[t], vocab_start + v, w.shape[0])
                d.scatter_add_(1, col[:, None], -here[:, None].float())
                d.mul_(c[:, None])
                if weight.dtype != torch.float32:
                    d = d.to(weight.dtype)
                if need_h:
                    acc_h.addmm_(d, w) if d.dtype == torch.float32 else acc_h.add_(d @ w)
                if need_w:
                    grad_w.add(v, d.t(), h)
                del d
        ctx.save_for_backward(coeff)
        ctx.grads = (grad_h, grad_w)
        ctx.hidden_dtype, ctx.tp_group = hidden.dtype, tp_group
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (coeff,) = ctx.saved_tensors
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        g = torch.where(coeff != 0, grad_loss.float(), 0.0)
        den = (coeff * coeff).sum()
        r = torch.where(den > 0, (g * coeff).sum() / den.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        # The incoming gradient must be r * weights: otherwise NaN, not a silently wrong gradient (no host sync).
        off = ((g - r * coeff).abs() > 1e-5 * r.abs()).any()
        factor = torch.where(off, float("nan"), r)
        zero = r == 0  # a zeroed loss: exact zeros, also where the forward's gradients hold NaN
        out_h = out_w = None
        if grad_h is not None:
            if ctx.tp_group is not None:  # each rank holds its vocabulary rows' part; the input is replicated
                dist.all_reduce(grad_h, group=ctx.tp_group)
            out_h = grad_h.mul_(factor).masked_fill_(zero, 0.0).to(ctx.hidden_dtype)
        if grad_w is not None:
            acc = grad_w.grad
            out_w = acc.mul_(factor.to(acc.dtype)).masked_fill_(zero, 0.0).to(grad_w.weight.dtype)
        return out_h, out_w, None, None, None, None, None, None, None
