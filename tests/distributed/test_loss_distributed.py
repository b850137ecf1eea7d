"""Loss package over real gloo process groups, against one-process references computed in the same worker.

- vocab-parallel per_token_ce (T=2, 3; V=101 does not divide) vs full-logits autograd;
- exact global selection (2 and 4 ranks, unequal sizes, heavy ties) vs a brute-force sort of the concatenation;
- the objective at DP=2 with DeepSpeed-style gradient averaging vs one process on the whole batch.
"""

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _spawn import run_gloo

from megaslm.loss import Objective, compute_objective, per_token_ce, select_tokens_with_threshold
from megaslm.loss.selection import global_quantiles

pytestmark = pytest.mark.slow


def assert_close(actual, expected, rtol, atol):
    # Not torch.testing.assert_close: with a process group up it imports torch.distributed.tensor (~5 s).
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual, expected)
    err = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert (err <= 0).all(), f"max excess error {err.max().item():.3g}:\n{actual}\n{expected}"


@contextlib.contextmanager
def counting_all_reduces():
    """Yields a list that receives the element count of every dist.all_reduce made inside the block."""
    calls = []
    real_all_reduce = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = real_all_reduce


# ---- vocab-parallel cross-entropy ------------------------------------------------------------------------------


def _vocab_parallel_worker(rank, world, vocab, chunk_size, sparse=False, keep_bytes=0, fused=False):
    g = torch.Generator().manual_seed(11)  # same inputs on every rank
    hidden_size = 12
    full_w = torch.randn(vocab, hidden_size, generator=g) / 3
    hidden0 = torch.randn(2, 7, hidden_size, generator=g) * 2
    labels = torch.randint(0, vocab, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, -1] = vocab - 1  # the last shard's last row
    grad_out = torch.rand(2, 7, generator=g) + 0.5
    if sparse:  # SLM: about 60% of the tokens carry a gradient, the rest exactly 0
        grad_out *= torch.rand(2, 7, generator=g) < 0.6
    if fused:  # CLM: one scalar times the labelled tokens, known before the forward
        grad_out = (labels != -100).float() * 0.125

    # Reference: one process, full weight, full logits, autograd.
    h_ref, w_ref = hidden0.clone().requires_grad_(), full_w.clone().requires_grad_()
    ref = F.cross_entropy((h_ref @ w_ref.t()).view(-1, vocab), labels.view(-1), reduction="none").view(2, 7)
    (ref * grad_out).sum().backward()

    shard = torch.tensor_split(full_w, world, dim=0)[rank].clone().requires_grad_()
    hidden = hidden0.clone().requires_grad_()
    with counting_all_reduces() as calls:
        if fused:  # the vocabulary range by arithmetic; chunk_size is the fused path's token chunk
            from megaslm.loss.per_token_ce import shard_range

            vocab_range = (shard_range(vocab, world, rank)[0], vocab)
            loss = per_token_ce(hidden, shard, labels, tp_group=dist.group.WORLD, vocab_block=16,
                                grad_weights=labels != -100, fused_chunk=chunk_size, vocab_range=vocab_range)
            (torch.where(labels != -100, loss, 0.0).sum() * 0.125).backward()
        else:
            loss = per_token_ce(hidden, shard, labels, chunk_size=chunk_size, tp_group=dist.group.WORLD,
                                vocab_block=16, keep_bytes=keep_bytes)
            (loss * grad_out).sum().backward()
    if fused:  # max and sums per token chunk, hidden-state gradient; no row-count all-reduce
        assert len(calls) == 2 * -(-14 // (chunk_size or 14)) + 1, calls
    else:  # Row counts, max, sums, hidden-state gradient: four all-reduces whatever the chunking.
        assert len(calls) == 4, calls

    assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    assert (loss[labels == -100] == 0).all()
    assert_close(hidden.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
    assert_close(shard.grad, torch.tensor_split(w_ref.grad, world, dim=0)[rank], rtol=1e-5, atol=1e-6)
    # Bit-identical losses on every rank: all of them feed the same selection.
    gathered = [torch.empty_like(loss) for _ in range(world)]
    dist.all_gather(gathered, loss.detach())
    assert all(torch.equal(t, gathered[0]) for t in gathered)


@pytest.mark.parametrize("world,vocab,chunk_size,sparse,keep_bytes",
                         [(2, 101, 5, False, 0), (3, 101, None, False, 0), (3, 2, 4, False, 0),
                          (2, 101, 5, True, 0), (2, 101, None, True, 2 * 14 * 16 * 4)])
def test_vocab_parallel_matches_full_weight(world, vocab, chunk_size, sparse, keep_bytes):
    # (3, 2): a vocabulary smaller than the group leaves the last rank an empty shard. sparse: SLM-style gradient
    # (the backward works on the selected tokens only); keep_bytes: two vocabulary blocks kept from forward.
    run_gloo(_vocab_parallel_worker, world, vocab, chunk_size, sparse, keep_bytes)


@pytest.mark.parametrize("world,vocab,chunk_size", [(2, 101, 5), (3, 101, None), (3, 2, 4)])
def test_vocab_parallel_fused_head_matches_full_weight(world, vocab, chunk_size):
    run_gloo(_vocab_parallel_worker, world, vocab, chunk_size, False, 0, True)


# ---- fused head under ZeRO-3 ------------------------------------------------------------------------------------


def _zero3_fused_worker(rank, world):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.model.build import TokenLossModel

    cfg = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    ds = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * world, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 97, (2, 9), generator=g)
    labels = torch.where(torch.rand(2, 9, generator=g) < 0.2, -100, torch.randint(0, 97, (2, 9), generator=g))
    import importlib

    ptc = importlib.import_module("megaslm.loss.tiles")  # the tile code both heads call

    real, rows = ptc.chunk_logits, []
    ptc.chunk_logits = lambda h, w: rows.append(h.shape[0]) or real(h, w)
    grads = []
    for fused in (False, True):
        rows.clear()
        torch.manual_seed(0)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            lm = LlamaForCausalLM(cfg)
        engine, *_ = deepspeed.initialize(model=TokenLossModel(lm, zero3=True), config=ds,
                                          model_parameters=[p for p in lm.parameters()])
        loss = engine(ids, labels, fused=fused)
        engine.backward(torch.where(labels != -100, loss, 0.0).sum() / 7.0)
        grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        engine.destroy()
        # fused: every token's logits once (3 head matmuls); recompute: the labelled ones again in backward
        assert sum(rows) == 18 + (0 if fused else int((labels != -100).sum())), (fused, rows)
    ptc.chunk_logits = real
    assert grads[0].keys() == grads[1].keys() and any("lm_head" in n for n in grads[0])
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_fused_head_under_zero3_matches_the_recompute_head():
    run_gloo(_zero3_fused_worker, 2, timeout=300)


# ---- exact global selection -------------------------------------------------------------------------------------


def _local_batch(rank, cols=6):
    g = torch.Generator().manual_seed(100 + rank)
    rows = [3, 1, 4, 2][rank]  # unequal micro-batches
    excess = torch.randint(0, 4, (rows, cols), generator=g).float() / 2  # heavy ties
    valid = torch.rand(rows, cols, generator=g) < 0.7
    if rank == 1:
        valid[:] = False  # a rank with nothing to select
    return excess, valid


def _selection_worker(rank, world, ratio):
    batches = [_local_batch(r) for r in range(world)]
    excess, valid = batches[rank]

    with counting_all_reduces() as calls:
        mask, threshold = select_tokens_with_threshold(excess, valid, ratio, "global")

    # Brute force on the concatenation: sort by (excess desc, flat index asc), keep ceil(ratio * n).
    all_ex = torch.cat([b[0].flatten() for b in batches]).tolist()
    all_ok = torch.cat([b[1].flatten() for b in batches]).tolist()
    ids = sorted((i for i in range(len(all_ex)) if all_ok[i]), key=lambda i: (-all_ex[i], i))
    k = math.ceil(ratio * len(ids) - 1e-9)
    keep = set(ids[:k])
    offset = sum(b[0].numel() for b in batches[:rank])
    expected = torch.tensor([offset + i in keep for i in range(excess.numel())]).view_as(valid)
    assert torch.equal(mask, expected)
    assert threshold == all_ex[ids[k - 1]]

    count = torch.tensor([mask.sum().item()])
    dist.all_reduce(count)
    assert count.item() == k
    thresholds = [None] * world
    dist.all_gather_object(thresholds, threshold)
    assert len(set(thresholds)) == 1
    # Collectives, a fixed three whatever the data: the counts with the first 16-bit digit's histogram, the second
    # digit's histogram, each rank's count of tokens tied at the k-th value.
    assert calls == [2 + 65536, 65536, world], calls

    qs = [0.1, 0.5, 0.9]
    ordered = sorted(all_ex[i] for i in ids)
    assert global_quantiles(excess, valid, qs) == [ordered[math.floor(q * (len(ordered) - 1))] for q in qs]


@pytest.mark.parametrize("world", [2, 4])
def test_global_selection_is_exact(world):
    run_gloo(_selection_worker, world, 0.55)


# ---- DP=2 objective vs one process ------------------------------------------------------------------------------


def _model_and_batch():
    g = torch.Generator().manual_seed(5)
    inputs = torch.randn(4, 6, 5, generator=g)
    labels = torch.randint(0, 13, (4, 6), generator=g)
    labels[torch.rand(4, 6, generator=g) < 0.2] = -100
    ref_loss = torch.rand(4, 6, generator=g) * 3
    source = torch.randint(0, 2, (4, 6), generator=g)
    proj = torch.randn(5, 8, generator=g)
    head = torch.randn(13, 8, generator=g) / 2
    return inputs, labels, ref_loss, source, proj, head


def _step(rows, objective, scope, group):
    """Loss and parameter gradients of a tiny linear model on `rows` of the batch."""
    inputs, labels, ref_loss, source, proj, head = _model_and_batch()
    proj, head = proj.requires_grad_(), head.requires_grad_()
    token_loss = per_token_ce(inputs[rows] @ proj, head, labels[rows], chunk_size=4)
    loss, stats = compute_objective(token_loss, ref_loss[rows], labels[rows] != -100,
                                    objective=Objective(objective, scope=scope),
                                    ratio=0.6, dp_group=group, source=source[rows], num_sources=2)
    loss.backward()
    return proj.grad, head.grad, stats


def _dp_worker(rank, world):
    solo = [dist.new_group([r]) for r in range(world)][rank]  # a one-rank group: the DP=1 run
    for objective, scope in [("slm", "global"), ("slm", "sequence"), ("clm", "global")]:
        rows = slice(2 * rank, 2 * rank + 2)
        g_proj, g_head, stats = _step(rows, objective, scope, dist.group.WORLD)
        for grad in (g_proj, g_head):  # what DeepSpeed does: average over the data-parallel group
            dist.all_reduce(grad)
            grad /= world
        ref_proj, ref_head, ref_stats = _step(slice(0, 4), objective, scope, solo)
        assert_close(g_proj, ref_proj, rtol=1e-5, atol=1e-6)
        assert_close(g_head, ref_head, rtol=1e-5, atol=1e-6)
        assert stats.keys() == ref_stats.keys()
        for key, value in ref_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # The trainer's stop flag rides on the metrics all-reduce: one rank asking is seen by all, nothing else moves.
    inputs, labels, ref_loss, _, _, _ = _model_and_batch()
    token_loss = torch.rand(2, 6, generator=torch.Generator().manual_seed(rank))
    valid = labels[2 * rank:2 * rank + 2] != -100
    args = (token_loss, ref_loss[2 * rank:2 * rank + 2], valid)
    kw = dict(objective=Objective("slm", scope="global"), ratio=0.6, dp_group=dist.group.WORLD)
    _, plain = compute_objective(*args, **kw)
    _, flagged = compute_objective(*args, **kw, stop_requested=rank == 1)
    assert flagged.pop("stop_requested") == 1.0 and flagged == plain


def test_dp2_gradient_equals_dp1_on_concatenated_batch():
    run_gloo(_dp_worker, 2)


def _nan_worker(rank, world):
    """A NaN score on rank 0 only: every rank's loss is NaN in the same micro-step (the NaN count rides on the
    metrics all-reduce), for the local scopes too, and no rank is left in a collective."""
    inputs, labels, ref_loss, _, _, _ = _model_and_batch()
    rows = slice(2 * rank, 2 * rank + 2)
    valid = labels[rows] != -100
    ref = ref_loss[rows].clone()
    if rank == 0:
        ref[valid] = float("nan")
    token_loss = torch.rand(2, 6, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    for scope in ("sequence", "rank", "global"):
        loss, stats = compute_objective(token_loss, ref, valid, objective=Objective("slm", scope=scope), ratio=0.5,
                                        dp_group=dist.group.WORLD)
        assert torch.isnan(loss) and math.isnan(stats["loss"]), scope
        assert "threshold" not in stats, scope


def test_nan_score_on_one_rank_voids_the_step_on_every_rank():
    run_gloo(_nan_worker, 2)
