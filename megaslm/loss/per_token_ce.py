"""Per-token cross-entropy of an LM head, tiled over tokens and vocabulary, optionally vocab-parallel.

`per_token_ce(hidden, weight, labels)` equals
`F.cross_entropy(hidden @ weight.T, labels, reduction="none", ignore_index=...)` in float32, but never holds the
full [tokens, vocab] logits. The logits are computed one [token chunk, vocabulary block] tile at a time. Forward
keeps only each token's logsumexp (an online softmax over the blocks: running max and rescaled sum of exps);
backward recomputes each tile from it. Blocking the vocabulary, not only the tokens, lets every tile see all the
tokens: each weight block is read once per pass and each block of the weight gradient is written once, where
token chunks would re-read the whole weight and re-add the whole weight gradient for every chunk.

With `tp_group`, `weight` is this rank's slice of the vocabulary (`torch.tensor_split(full_weight, G, dim=0)[rank]`)
and the per-token statistics are combined with two all-reduces per call (Megatron's vocab-parallel cross-entropy:
max, then sum-exp and target logit), so the logits are never gathered either.

SLM-aware backward: only the tokens whose incoming gradient is nonzero enter the backward matmuls. Under selective
language modeling an unselected token (and an ignored label) has gradient exactly 0: its logits are not
recomputed, its row of the hidden-state gradient is 0 and it adds nothing to the weight gradient. The result
equals full-logits autograd on the same mask (up to float summation order).

Memory for speed (`keep_bytes`): the first tiles' exp-logits, up to `keep_bytes` in all, are kept from forward to
backward and skip the recompute. 0 (the default) keeps nothing. docs/loss_head.md has the measurements.

Fused (`grad_weights`): when the caller knows the per-token shape of the gradient before the forward (CLM: the
labelled tokens, times one scalar that comes with the backward), the gradients are formed in the forward and
nothing is recomputed: 3 head matmuls instead of 4 (megaslm/loss/fused_ce.py).

Host syncs: none on the fused path and in the forward (with `check_labels=False`); the recompute backward sizes
its compaction of the tokens that carry a gradient with one `nonzero` per token chunk.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaslm.loss import tiles
from megaslm.loss.fused_ce import FusedLinearCE, fused_chunk_tokens

# Vocabulary rows per block: a block's fp32 logits hold about half as many values as the hidden states
# (tokens x hidden_size / 2), but never fewer rows than this, below which the matmuls are too thin to run at speed
# (docs/loss_head.md has the measurements).
MIN_VOCAB_BLOCK = 128
# Without a backward (the reference model) and on the fused path, blocks of at least this many rows (the tile
# budget permitting) run fewer, wider matmuls; docs/loss_head.md.
WIDE_VOCAB_BLOCK = 1024
NO_GRAD_TILE_BYTES = 64 * 2**20


def default_vocab_block(hidden_size: int) -> int:
    """Vocabulary rows per block when every token is in one chunk: a [tokens, block] fp32 block of logits then
    holds tokens * hidden_size / 2 values, half the hidden states (Liger-Kernel sizes its chunks like them)."""
    return max(MIN_VOCAB_BLOCK, -(-hidden_size // 2))


def per_token_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_block: int | None = None,
    keep_bytes: int = 0,
    with_entropy: bool = False,
    grad_weights: torch.Tensor | None = None,
    fused_chunk: int | None = None,
    vocab_range: tuple[int, int] | None = None,
    check_labels: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Float32 cross-entropy of every position, shaped like `labels`.

    hidden: [..., H] final hidden states (any float dtype); weight: [V_local, H] LM-head rows held by this rank;
    labels: [...] long, already aligned with hidden's positions (no shifting here). Positions whose label is
    `ignore_index` give exactly 0 loss and 0 gradient. Differentiable w.r.t. hidden and weight.

    chunk_size: tokens per chunk (None: all tokens in one chunk; the vocabulary blocks bound the memory).
    vocab_block: vocabulary rows per block (None: `default_vocab_block`). Memory: one fp32 [chunk, block] tensor.
    tp_group: vocab-parallel mode. Rank r of the group passes `torch.tensor_split(full_weight, G, dim=0)[r]` and
    gets the full-weight call's losses on every rank. In backward, hidden.grad is summed over the group (so it
    equals the full-weight call's on every rank) and weight.grad holds the shard's rows of the full gradient.
    Every rank of the group must call this with the same hidden shape, labels and chunk_size.
    keep_bytes: budget for fp32 [chunk, block] exp-logits kept from forward to backward (skipping their
    recompute), in order; only used when a gradient will be taken. The logits matmul then runs 3 times, not 4.
    with_entropy: also return the predictive entropy -sum(p log p) of every position (0 where ignored), from the
    same online softmax (one more running sum per token, no extra collective; no gradient flows through it).
    grad_weights: [...] like labels (float or bool): the caller promises that the gradient reaching the losses is
    `r * grad_weights` for one scalar r (CLM: the labelled tokens; r is the normaliser). The head's gradients
    are then formed in the forward (fused_ce.py); an incoming gradient of another shape gives NaN gradients.
    Only used when a gradient will be taken. fused_chunk: tokens per chunk on that path (None:
    `fused_chunk_tokens`); its vocabulary block is vocab_block when given, else at least WIDE_VOCAB_BLOCK
    (the chunk's tiles are held together anyway: larger blocks cost no memory there). chunk_size and keep_bytes
    are not used on that path, nor with with_entropy (the entropy score is SLM's: its weights come after the
    forward).
    vocab_range: (first vocab id of this rank's rows, full vocab size) under tp_group; None: one all-reduce.
    check_labels: raise on a label outside the vocabulary (one host sync). False: no sync; such a token's loss
    is NaN instead (the trainer's labels come from shards checked against the model's vocabulary).
    """
    _check_arguments(hidden, weight, labels, chunk_size, vocab_block, keep_bytes)
    vocab_start, vocab_size = ((vocab_range or _vocab_range(weight.shape[0], tp_group, weight.device))
                               if tp_group is not None else (0, weight.shape[0]))
    if chunk_size is None:
        chunk_size = max(1, labels.numel())
    block_given = vocab_block is not None
    # Kept blocks only pay off when backward runs; the reference model's no-grad call never keeps.
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # No backward: a wider transient tile, up to 64 MiB (CPU: -26% at H 256, V 32000)
    vocab_block = vocab_block or max(default_vocab_block(hidden.shape[-1]), 0 if grad_wanted else min(
        WIDE_VOCAB_BLOCK, NO_GRAD_TILE_BYTES // (4 * chunk_size)))
    keep_blocks = keep_bytes // (4 * chunk_size * vocab_block) if grad_wanted else 0

    labels_flat = labels.reshape(-1)
    valid = labels_flat != ignore_index
    # A label outside the vocabulary would silently read another token's logit under vocab sharding.
    bad = valid & ((labels_flat < 0) | (labels_flat >= vocab_size))
    if check_labels and bool(bad.any()):  # host sync: once per call, to raise before any collective
        raise ValueError(
            f"per_token_ce: label {int(labels_flat[bad][0])} outside the vocabulary [0, {vocab_size}) "
            "(tokenizer and model vocabulary differ?)"
        )
    hidden_flat = hidden.reshape(-1, hidden.shape[-1])
    entropy = None
    if grad_weights is not None and grad_wanted and not with_entropy:
        block = vocab_block if block_given else max(vocab_block, WIDE_VOCAB_BLOCK)
        loss = _fused(hidden_flat, weight, labels_flat, valid, grad_weights, labels.shape, fused_chunk, block,
                      tp_group, vocab_start)
    else:
        loss, entropy = _ChunkedLinearCE.apply(hidden_flat, weight, labels_flat, valid, chunk_size, vocab_block,
                                               tp_group, vocab_start, keep_blocks, with_entropy)
    if not check_labels:  # no sync: an out-of-vocabulary label makes its loss NaN (the skip guard sees it)
        loss = torch.where(bad, float("nan"), loss)
    if with_entropy:
        return loss.view(labels.shape), entropy.view(labels.shape)
    return loss.view(labels.shape)


def _check_arguments(hidden, weight, labels, chunk_size, vocab_block, keep_bytes) -> None:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"per_token_ce: hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"per_token_ce: weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise ValueError("per_token_ce: hidden and weight must be floating point")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"per_token_ce: chunk_size must be >= 1, got {chunk_size}")
    if vocab_block is not None and vocab_block < 1:
        raise ValueError(f"per_token_ce: vocab_block must be >= 1, got {vocab_block}")
    if keep_bytes < 0:
        raise ValueError(f"per_token_ce: keep_bytes must be >= 0, got {keep_bytes}")


def _fused(hidden_flat, weight, labels_flat, valid, grad_weights, shape, fused_chunk, block, tp_group, vocab_start):
    """The fused head (fused_ce.py): gradients formed in the forward."""
    if grad_weights.shape != shape:
        raise ValueError(f"per_token_ce: grad_weights {tuple(grad_weights.shape)} does not match labels "
                         f"{tuple(shape)}")
    if fused_chunk is not None and fused_chunk < 1:
        raise ValueError(f"per_token_ce: fused_chunk must be >= 1, got {fused_chunk}")
    chunk = fused_chunk or fused_chunk_tokens(labels_flat.numel(), weight.shape[0])
    return FusedLinearCE.apply(hidden_flat, weight, labels_flat, valid, grad_weights.reshape(-1).float(),
                               max(1, chunk), block, tp_group, vocab_start)


def shard_range(vocab_size: int, group_size: int, rank: int) -> tuple[int, int]:
    """(first vocabulary id, rows) of rank `rank` when the head's rows are split like `torch.tensor_split`
    (DeepSpeed AutoTP's vocab-parallel head): arithmetic, no collective."""
    base, extra = divmod(vocab_size, group_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def vocab_range_of(head: torch.nn.Module, weight: torch.Tensor, vocab_size: int,
                   group: dist.ProcessGroup) -> tuple[int, int]:
    """(first vocabulary id of this rank's rows, full vocabulary size) for per_token_ce's vocab_range, without a
    collective: DeepSpeed's `vocab_start_index` when the head records it, else the tensor_split layout. Raises if
    this rank's row count does not fit the layout."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    start, rows = shard_range(vocab_size, world, rank)
    start = int(getattr(head, "vocab_start_index", start))
    if weight.shape[0] != rows and not hasattr(head, "vocab_start_index"):
        raise RuntimeError(f"tensor parallel: rank {rank} holds {weight.shape[0]} head rows, the tensor_split "
                           f"layout of {vocab_size} over {world} ranks gives {rows}")
    return start, vocab_size


def _vocab_range(local_rows: int, group: dist.ProcessGroup, device: torch.device) -> tuple[int, int]:
    """(first vocab id held by this rank, full vocab size), from one all-reduce of every rank's row count."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = local_rows
    dist.all_reduce(sizes, group=group)
    sizes = sizes.tolist()
    return sum(sizes[:rank]), sum(sizes)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, valid, chunk_size, vocab_block, tp_group, vocab_start, keep_blocks,
                with_entropy=False):
        n, rows = hidden.shape[0], weight.shape[0]
        # This rank's softmax statistics over its rows, online over vocabulary blocks (flash-attention style):
        # running max, sum of exp(logit - running max), and the target logit where the label is here.
        run_max = torch.full((n,), float("-inf"), device=hidden.device)
        sum_exp = torch.zeros(n, device=hidden.device)
        target = torch.zeros(n, device=hidden.device)
        ent = _Entropy(n, hidden.device) if with_entropy else None
        kept = {}  # (token chunk, vocab block) -> (exp(logits - max_at_that_block), that max)
        for s in range(0, n, chunk_size):
            t = slice(s, min(n, s + chunk_size))
            h = hidden[t].to(weight.dtype)
            for v in range(0, rows, vocab_block):
                logits = tiles.chunk_logits(h, weight[v:v + vocab_block])
                col, here = tiles.local_targets(labels[t], valid[t], vocab_start + v, logits.shape[1])
                target[t] = torch.where(here, logits.gather(1, col[:, None]).squeeze(1), target[t])
                new_max = torch.maximum(run_max[t], logits.amax(dim=1))
                # In place: exp(logits - max) reuses the block's buffer.
                block_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                if ent is not None:
                    ent.add_block(t, logits, run_max[t], new_max, sum_exp[t])
                sum_exp[t] = sum_exp[t] * (run_max[t] - new_max).exp() + block_sum
                run_max[t] = new_max
                if len(kept) < keep_blocks:
                    kept[(s, v)] = (logits, new_max)
                del logits  # before the next block's logits exist, not after
        if tp_group is not None:
            # Two all-reduces per call whatever the chunking: the global max, then both sums rescaled to it
            # (the owner rank holds the target logit, the others hold 0).
            glob_max = run_max.clone()
            dist.all_reduce(glob_max, op=dist.ReduceOp.MAX, group=tp_group)
            stats = [sum_exp * (run_max - glob_max).exp(), target]
            if ent is not None:
                stats.append(ent.rescaled(run_max, glob_max, sum_exp))
            both = torch.stack(stats)
            dist.all_reduce(both, group=tp_group)
            sum_exp, target, run_max = both[0], both[1], glob_max
            if ent is not None:
                ent.s1 = both[2]
        lse = sum_exp.log() + run_max
        loss = torch.where(valid, lse - target, 0.0)
        entropy = torch.where(valid, sum_exp.log() - ent.s1 / sum_exp, 0.0) if ent is not None else None
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, labels, valid, lse)
        ctx.chunk_size, ctx.vocab_block, ctx.tp_group, ctx.vocab_start = chunk_size, vocab_block, tp_group, vocab_start
        ctx.kept = kept
        return loss, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_entropy=None):
        hidden, weight, labels, valid, lse = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, rows = hidden.shape[0], weight.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = tiles.WeightGrad(weight, n > ctx.chunk_size) if need_w else None
        # d loss_i / d logit_ij = softmax_ij - [j == label_i], scaled by the incoming gradient; 0 when ignored.
        scale = torch.where(valid, grad_loss.float(), 0.0)
        live = scale != 0
        for s in range(0, n if rows > 0 and (need_h or need_w) else 0, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            # Only the tokens that carry a gradient enter the matmuls: compact them (no copy when all do).
            idx = live[s:e].nonzero().squeeze(1)  # host sync: sizes the matmuls
            if idx.numel() == 0:
                continue
            dense = idx.numel() == e - s
            pos = slice(s, e) if dense else idx + s
            h = hidden[pos].to(weight.dtype)
            y, ok, sc, lse_c = labels[pos], valid[pos], scale[pos], lse[pos]
            # fp32 sum over vocabulary blocks; written straight into grad_h when that is fp32 and contiguous
            acc_h = None
            if need_h:
                acc_h = grad_h[s:e] if dense and grad_h.dtype == torch.float32 else hidden.new_zeros(
                    (idx.numel(), hidden.shape[1]), dtype=torch.float32)
            for v in range(0, rows, ctx.vocab_block):
                w = weight[v:v + ctx.vocab_block]
                if (s, v) in kept:
                    d, block_max = kept.pop((s, v))
                    if not dense:
                        d = d.index_select(0, idx)
                        block_max = block_max[idx]
                    d.mul_((block_max - lse_c).exp_()[:, None])  # the kept exp(logits - max) -> softmax
                else:
                    d = tiles.chunk_logits(h, w).sub_(lse_c[:, None]).exp_()  # softmax, from the saved lse
                col, here = tiles.local_targets(y, ok, ctx.vocab_start + v, w.shape[0])
                d.scatter_add_(1, col[:, None], -here[:, None].float())
                d.mul_(sc[:, None])
                if weight.dtype != torch.float32:
                    d = d.to(weight.dtype)  # the fp32 buffer goes; matmuls run in the weight's dtype
                if need_h:
                    acc_h.addmm_(d, w) if d.dtype == torch.float32 else acc_h.add_(d @ w)
                if need_w:
                    grad_w.add(v, d.t(), h)
                del d  # before the next block's logits exist, not after
            if need_h and acc_h.data_ptr() != grad_h[s:e].data_ptr():
                grad_h[pos] = acc_h.to(hidden.dtype)
        if need_h and ctx.tp_group is not None:
            # Each rank holds the contribution of its own vocab rows; the head's input is replicated.
            dist.all_reduce(grad_h, group=ctx.tp_group)
        return grad_h, grad_w.result() if need_w else None, None, None, None, None, None, None, None, None


class _Entropy:
    """The running sum s1 = sum_j exp(l_j - m) * (l_j - m) beside sum_exp = sum_j exp(l_j - m), so that the
    entropy is log(sum_exp) - s1 / sum_exp; rescaled like sum_exp when the running max m moves."""

    def __init__(self, n: int, device):
        self.s1 = torch.zeros(n, device=device)

    @staticmethod
    def _moved(s1, old_max, new_max, old_sum):
        # sum exp(l - new) (l - new) = r * (s1 + (old - new) * old_sum), r = exp(old - new); 0 before any block.
        return torch.where(old_sum > 0, (old_max - new_max).exp() * (s1 + (old_max - new_max) * old_sum), 0.0)

    def add_block(self, t, exp_shifted, old_max, new_max, old_sum) -> None:
        """exp_shifted: the block's exp(l - new_max); xlogy(e, e) = e * (l - new_max)."""
        self.s1[t] = self._moved(self.s1[t], old_max, new_max, old_sum) + torch.special.xlogy(
            exp_shifted, exp_shifted).sum(dim=1)

    def rescaled(self, local_max, glob_max, local_sum):
        return self._moved(self.s1, local_max, glob_max, local_sum)
