"""Token selection against a brute-force sort with the documented tie rule (lower flat index wins a tie)."""

import math
from fractions import Fraction

import pytest
import torch

from megaslm.loss import (
    global_kth_largest,
    global_quantiles,
    num_to_keep,
    select_tokens,
    select_tokens_with_threshold,
)
from megaslm.loss.selection import _float_keys


def brute_force(excess, valid, ratio, scope):
    """Sort (value desc, flat index asc) in plain Python; k = ceil(ratio * n) in exact decimal arithmetic."""
    rows, cols = excess.shape
    flat, ok = excess.flatten().tolist(), valid.flatten().tolist()
    groups = [[r * cols + c for c in range(cols)] for r in range(rows)] if scope == "sequence" else [
        list(range(rows * cols))]
    mask = [False] * (rows * cols)
    for ids in groups:
        ids = [i for i in ids if ok[i]]
        k = math.ceil(Fraction(str(ratio)) * len(ids))
        for i in sorted(ids, key=lambda i: (-flat[i], i))[:k]:
            mask[i] = True
    return torch.tensor(mask).view(rows, cols)


def _cases():
    g = torch.Generator().manual_seed(1)
    yield "continuous", torch.randn(5, 9, generator=g)
    yield "heavy ties", torch.randint(-2, 3, (6, 7), generator=g).float()
    yield "all equal", torch.full((4, 8), 0.25)
    yield "tiny float64", torch.randn(3, 10, generator=g, dtype=torch.float64) * 1e-300
    yield "bf16", torch.randn(4, 6, generator=g).to(torch.bfloat16)
    yield "signed zeros and infs", torch.tensor([[0.0, -0.0, 1.0, -math.inf], [math.inf, -0.0, 0.0, -1.0]])


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
@pytest.mark.parametrize("ratio", [1e-6, 0.3, 0.5, 0.7, 0.999, 1.0])
def test_matches_brute_force(scope, ratio):
    for seed, (name, excess) in enumerate(_cases()):
        valid = torch.rand(excess.shape, generator=torch.Generator().manual_seed(seed)) < 0.75
        mask, threshold = select_tokens_with_threshold(excess, valid, ratio, scope)
        ref = brute_force(excess.double(), valid, ratio, scope)
        assert torch.equal(mask, ref), name
        assert not (mask & ~valid).any()
        chosen = excess.double()[ref]
        if chosen.numel():
            assert threshold == chosen.min().item(), name
        else:
            assert math.isnan(threshold), name


def test_global_threshold_is_kth_value():
    excess = torch.tensor([[3.0, 1.0, 2.0, 2.0], [5.0, 2.0, 0.0, 4.0]])
    valid = torch.ones_like(excess, dtype=torch.bool)
    mask, threshold = select_tokens_with_threshold(excess, valid, 0.5, "global")
    # k = 4 of [5, 4, 3, 2, 2, 2, 1, 0]: the first 2 in flat order (index 2) wins the tie.
    assert threshold == 2.0
    assert mask.tolist() == [[True, False, True, False], [True, False, False, True]]


def test_ratio_one_selects_exactly_the_valid_tokens():
    excess = torch.randn(4, 5)
    valid = torch.rand(4, 5) < 0.6
    for scope in ("sequence", "rank", "global"):
        assert torch.equal(select_tokens(excess, valid, 1.0, scope), valid)


def test_tiny_ratio_keeps_one_token_per_group_with_tokens():
    excess = torch.randn(3, 6)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1] = False
    assert select_tokens(excess, valid, 1e-9, "global").sum() == 1
    assert select_tokens(excess, valid, 1e-9, "sequence").sum(dim=1).tolist() == [1, 0, 1]


def test_nothing_valid_selects_nothing():
    excess = torch.randn(2, 4)
    valid = torch.zeros(2, 4, dtype=torch.bool)
    for scope in ("sequence", "rank", "global"):
        mask, threshold = select_tokens_with_threshold(excess, valid, 0.6, scope)
        assert not mask.any() and math.isnan(threshold)
    empty = torch.zeros(0, 5)
    assert select_tokens(empty, empty.bool(), 0.5, "global").shape == (0, 5)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_tokens(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), ratio)


def test_bad_scope_and_shapes():
    with pytest.raises(ValueError, match="scope"):
        select_tokens(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.5, "batch")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        select_tokens(torch.zeros(2), torch.ones(2, dtype=torch.bool), 0.5)


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_nan_excess_is_an_error_unless_masked(scope):
    excess = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        select_tokens(excess, torch.ones(1, 3, dtype=torch.bool), 0.5, scope)
    # A NaN on an unlabelled position is ignored.
    mask = select_tokens(excess, torch.tensor([[True, False, True]]), 0.5, scope)
    assert mask.tolist() == [[False, False, True]]


def test_num_to_keep_is_exact_on_decimal_ratios():
    assert num_to_keep(0.7, 10) == 7  # float: 0.7 * 10 = 7.000000000000001
    assert num_to_keep(0.1, 10) == 1  # binary 0.1 is slightly above 1/10
    assert num_to_keep(0.6, 5) == 3
    assert num_to_keep(0.6, 0) == 0
    assert num_to_keep(1e-9, 3) == 1
    assert num_to_keep(1.0, 12345) == 12345
    for pct in range(1, 101):
        for n in (1, 7, 10, 100, 1000, 4096 * 8):
            assert num_to_keep(pct / 100, n) == -(-pct * n // 100)


def test_float_keys_preserve_order():
    vals = torch.tensor([-math.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.5, 3e38, math.inf])
    for dtype, bits in ((torch.float32, 32), (torch.float64, 64)):
        keys, nbits = _float_keys(vals.to(dtype))
        assert nbits == bits
        unsigned = [int(k) % (1 << 64) for k in keys]  # the int64 patterns read as unsigned
        assert unsigned == sorted(unsigned)
        assert unsigned[4] == unsigned[5]  # -0.0 == 0.0
        assert len(set(unsigned)) == len(unsigned) - 1


def test_kth_largest_and_quantiles_match_sorting():
    g = torch.Generator().manual_seed(7)
    values = torch.randint(-5, 6, (7, 9), generator=g).float() / 4
    valid = torch.rand(7, 9, generator=g) < 0.8
    ordered = sorted(values[valid].tolist())
    n = len(ordered)
    for k in (1, 2, n // 2, n):
        assert global_kth_largest(values, valid, k) == ordered[n - k]
    qs = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]
    assert global_quantiles(values, valid, qs) == [ordered[math.floor(Fraction(str(q)) * (n - 1))] for q in qs]
    assert math.isnan(global_kth_largest(values, valid, 0))
    with pytest.raises(ValueError):
        global_kth_largest(values, valid, n + 1)
    assert all(math.isnan(v) for v in global_quantiles(values, torch.zeros_like(valid), [0.5, 0.9]))


# ---- on the device: no host sync ---------------------------------------------------------------------------------


def test_keep_count_is_num_to_keep_on_the_device():
    from megaslm.loss.selection import _quantile_rank, _quantile_rank_t, keep_count

    g = torch.Generator().manual_seed(3)
    ns = torch.cat([torch.arange(0, 300), torch.randint(0, 2**31 - 1, (300,), generator=g)])
    ratios = [1e-6, 0.3, 0.6, 0.7, 0.9333333333333333, 0.8666666666666667, 0.123456789012345, 0.999, 1.0]
    for ratio in ratios:  # 17-digit ratios make p * n overflow int64: the wrapped residual must still be exact
        assert keep_count(ratio, ns).tolist() == [num_to_keep(ratio, n) for n in ns.tolist()], ratio
    for q in (0.0, 0.1, 0.5, 0.9, 1.0, 0.123456789012345):
        assert _quantile_rank_t(q, ns).tolist() == [_quantile_rank(q, n) for n in ns.tolist()], q
    # A ratio beyond int64's exact range takes the host path and stays exact.
    assert keep_count(1.2345678901234567e-05, ns[:50]).tolist() == [
        num_to_keep(1.2345678901234567e-05, n) for n in ns[:50].tolist()]


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_select_on_device_makes_no_host_sync(monkeypatch, scope):
    from megaslm.loss.selection import select_on_device

    excess = torch.randint(-3, 4, (5, 12), generator=torch.Generator().manual_seed(2)).float()
    valid = torch.rand(5, 12, generator=torch.Generator().manual_seed(4)) < 0.8
    ref_mask, ref_threshold = select_tokens_with_threshold(excess, valid, 0.55, scope)
    syncs = []
    for name in ("item", "tolist", "__bool__", "nonzero", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, _r=real, **k: syncs.append(_n) or _r(*a, **k))
    sel = select_on_device(excess, valid, 0.55, scope, (0.1, 0.5, 0.9))
    monkeypatch.undo()
    assert syncs == []
    assert torch.equal(sel.mask, ref_mask) and sel.threshold.item() == ref_threshold
    assert sel.quantiles.tolist() == global_quantiles(excess, valid, [0.1, 0.5, 0.9])
    assert int(sel.n_nan) == 0
    r, c = valid.nonzero()[0].tolist()
    excess[r, c] = math.nan  # counted, not raised
    assert int(select_on_device(excess, valid, 0.55, scope).n_nan) == 1
