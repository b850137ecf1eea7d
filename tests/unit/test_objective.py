"""compute_objective in one process, against losses and gradients computed by hand."""

import math

import pytest
import torch

from megaslm.config import SLMConfig
from megaslm.loss import Objective, compute_objective


def _batch(seed=0, rows=3, cols=8):
    g = torch.Generator().manual_seed(seed)
    token_loss = (torch.rand(rows, cols, generator=g) * 4).requires_grad_()
    ref_loss = torch.rand(rows, cols, generator=g) * 4
    valid = torch.rand(rows, cols, generator=g) < 0.8
    source = torch.randint(0, 3, (rows, cols), generator=g)
    return token_loss, ref_loss, valid, source


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def test_clm_is_mean_ce_over_valid_tokens():
    token_loss, _, valid, source = _batch()
    loss, stats = compute_objective(token_loss, None, valid, objective=Objective("clm", scope="global"), ratio=0.3,
                                    source=source, num_sources=4)
    expected = token_loss[valid].mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, token_loss), _grad(expected, token_loss))
    assert stats["loss"] == pytest.approx(expected.item()) == stats["loss_all"]
    assert stats["n_valid"] == valid.sum().item()
    for i in range(4):
        assert stats[f"tokens/{i}"] == (valid & (source == i)).sum().item()
    assert "selected_frac" not in stats and "threshold" not in stats


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_slm_ratio_one_equals_clm(scope):
    token_loss, ref_loss, valid, _ = _batch(1)
    clm, clm_stats = compute_objective(token_loss, None, valid, objective=Objective("clm", scope=scope), ratio=1.0)
    slm, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope=scope), ratio=1.0)
    torch.testing.assert_close(slm, clm)
    torch.testing.assert_close(_grad(slm, token_loss), _grad(clm, token_loss))
    assert stats["loss"] == pytest.approx(clm_stats["loss"])
    assert stats["selected_frac"] == 1.0 and "loss_unselected" not in stats


def test_slm_global_matches_hand_selection_and_stats():
    token_loss, ref_loss, valid, source = _batch(2, rows=4, cols=10)
    ratio = 0.6
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="global"),
                                    ratio=ratio,
                                    source=source, num_sources=3)
    excess = (token_loss.detach() - ref_loss).flatten()
    ids = [i for i in range(excess.numel()) if valid.flatten()[i]]
    ids.sort(key=lambda i: (-excess[i].item(), i))
    k = math.ceil(ratio * len(ids) - 1e-9)
    chosen = torch.zeros(excess.numel(), dtype=torch.bool)
    chosen[ids[:k]] = True
    chosen = chosen.view_as(valid)
    expected = token_loss[chosen].mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, token_loss), _grad(expected, token_loss))

    tl, ex = token_loss.detach().double(), (token_loss.detach() - ref_loss).double()
    unchosen = valid & ~chosen
    assert stats["n_valid"] == len(ids) and stats["n_selected"] == k
    assert stats["loss"] == pytest.approx(tl[chosen].mean().item()) == stats["loss_selected"]
    assert stats["loss_all"] == pytest.approx(tl[valid].mean().item())
    assert stats["loss_unselected"] == pytest.approx(tl[unchosen].mean().item())
    assert stats["ref_loss"] == pytest.approx(ref_loss[valid].double().mean().item())
    assert stats["selected_frac"] == pytest.approx(k / len(ids))
    assert stats["threshold"] == pytest.approx(ex[chosen].min().item())
    ordered = sorted(ex[valid].float().tolist())
    for q in (10, 50, 90):
        assert stats[f"excess_p{q}"] == pytest.approx(ordered[math.floor(q * (len(ordered) - 1) / 100)])
    for i in range(3):
        n_i = (valid & (source == i)).sum().item()
        assert stats[f"tokens/{i}"] == n_i
        assert stats[f"selected_frac/{i}"] == pytest.approx((chosen & (source == i)).sum().item() / n_i)


def test_sequence_scope_selects_per_row():
    token_loss, ref_loss, valid, _ = _batch(3, rows=3, cols=6)
    valid[:] = True
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="sequence"),
                                    ratio=0.5)
    excess = token_loss.detach() - ref_loss
    top = excess.topk(3, dim=1).indices
    chosen = torch.zeros_like(valid).scatter_(1, top, True)
    torch.testing.assert_close(loss, token_loss[chosen].mean())
    assert stats["n_selected"] == 9


def test_no_valid_tokens_gives_zero_loss_and_no_means():
    token_loss, ref_loss, valid, _ = _batch(4)
    valid[:] = False
    for objective in ("clm", "slm"):
        loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective(objective, scope="global"),
                                        ratio=0.5)
        assert loss.item() == 0.0 and (_grad(loss, token_loss) == 0).all()
        assert stats["n_valid"] == 0 and "loss" not in stats and "loss_all" not in stats
        assert all(math.isfinite(v) for v in stats.values())


def test_non_finite_unselected_losses_do_not_leak():
    token_loss, ref_loss, valid, _ = _batch(5)
    with torch.no_grad():
        token_loss[~valid] = float("nan")
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="rank"), ratio=0.5)
    assert torch.isfinite(loss) and torch.isfinite(_grad(loss, token_loss)).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_bad_arguments():
    token_loss, ref_loss, valid, _ = _batch()
    with pytest.raises(ValueError, match="objective"):
        compute_objective(token_loss, ref_loss, valid, objective=Objective("dpo", scope="global"), ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="global"), ratio=0.0)
    with pytest.raises(ValueError, match="scope"):
        compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="node"), ratio=0.5)
    with pytest.raises(ValueError, match="ref_loss"):
        compute_objective(token_loss, None, valid, objective=Objective("slm", scope="global"), ratio=0.5)


# ---------------------------------------------------------------------------------------------- weightings
def test_soft_at_small_temperature_matches_topk():
    """sigmoid((excess - t) / T) tends to the top-k mask; only the k-th token itself keeps weight 1/2."""
    token_loss, ref_loss, valid, _ = _batch(6, rows=4, cols=16)
    hard, hs = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="global"), ratio=0.4)
    soft, ss = compute_objective(token_loss, ref_loss, valid,
                                 objective=Objective("slm", scope="global", weighting="soft",
                                                     slm=SLMConfig(temperature=1e-4)),
                                 ratio=0.4)
    k = hs["n_selected"]
    # The k-th token's half weight moves the weighted mean by at most (max - min loss) / (2k - 1).
    tol = (token_loss.max() - token_loss.min()).item() / (2 * k - 1)
    assert abs(soft.item() - hard.item()) <= tol
    assert ss["effective_frac"] == pytest.approx((k - 0.5) / ss["n_valid"], abs=1e-6)
    assert ss["weight_entropy"] == pytest.approx(math.log(k), abs=0.05)
    assert ss["threshold"] == hs["threshold"] and ss["n_selected"] == k


def test_soft_weights_against_autograd():
    token_loss, ref_loss, valid, _ = _batch(7)
    loss, stats = compute_objective(token_loss, ref_loss, valid,
                                    objective=Objective("slm", scope="global", weighting="soft",
                                                        slm=SLMConfig(temperature=0.7)),
                                    ratio=0.5)
    excess = (token_loss.detach() - ref_loss)[valid]
    k = math.ceil(0.5 * int(valid.sum()))
    t = excess.sort(descending=True).values[k - 1]
    w = torch.zeros_like(token_loss)
    w[valid] = torch.sigmoid((excess - t) / 0.7)
    expected = (w * token_loss).sum() / w.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, token_loss), _grad(expected, token_loss))
    p = w[valid] / w.sum()
    assert stats["weight_entropy"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)
    assert stats["effective_frac"] == pytest.approx(w.sum().item() / valid.sum().item(), rel=1e-6)


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_score_loss_selects_the_top_loss_tokens_without_a_reference(scope):
    token_loss, _, valid, _ = _batch(8, rows=3, cols=10)
    loss, stats = compute_objective(token_loss, None, valid, objective=Objective("slm", scope=scope, score="loss"),
                                    ratio=0.3)
    tl = token_loss.detach()
    chosen = torch.zeros_like(valid)
    groups = [torch.arange(r * 10, r * 10 + 10) for r in range(3)] if scope == "sequence" else [torch.arange(30)]
    for idx in groups:  # brute force: sort each group's valid tokens by loss (ties: lower index first)
        cand = [int(i) for i in idx if valid.view(-1)[i]]
        cand.sort(key=lambda i: (-tl.view(-1)[i].item(), i))
        chosen.view(-1)[cand[:math.ceil(0.3 * len(cand))]] = True
    torch.testing.assert_close(loss, token_loss[chosen].mean())
    assert stats["n_selected"] == chosen.sum().item() and "ref_loss" not in stats
    # Its order statistics are named by the score: the quantiles of the loss, not of an excess.
    assert "excess_p50" not in stats
    if scope == "global":
        ordered = sorted(tl[valid].tolist())
        assert stats["loss_p50"] == pytest.approx(ordered[math.floor(0.5 * (len(ordered) - 1))])


def test_slm_ratio_schedule():
    from megaslm.loss.objective import slm_ratio

    assert [slm_ratio(0.6, s, 2) for s in range(4)] == [None, None, 0.6, 0.6]
    got = [slm_ratio(0.6, s, 1, 4) for s in range(7)]
    assert got[0] is None
    assert got[1:] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.6, 0.6])


# ---------------------------------------------------------------------------------------------- one optimizer step
def test_metrics_reduce_as_declared_over_micro_steps():
    """selected_frac over two micro-steps is selected over total and loss is token-weighted, not a mean of means."""
    from megaslm.loss.metrics import Metrics

    token_loss, ref_loss, valid, source = _batch(9, rows=4, cols=8)
    valid[:2, :6] = False  # the first micro-batch holds fewer labelled tokens
    parts = [compute_objective(token_loss[r], ref_loss[r], valid[r], objective=Objective("slm", scope="sequence"),
                               ratio=0.5,
                               source=source[r], num_sources=3)[1] for r in (slice(0, 2), slice(2, 4))]
    rec = Metrics.combine(parts)
    _, whole = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope="sequence"), ratio=0.5,
                                 source=source, num_sources=3)
    for key in ("loss", "loss_all", "selected_frac", "ref_loss", "n_valid", "n_selected", "selected_frac/1",
                "tokens/2", "loss_unselected"):
        assert rec[key] == pytest.approx(whole[key], rel=1e-9), key
    assert rec["selected_frac"] != pytest.approx((parts[0]["selected_frac"] + parts[1]["selected_frac"]) / 2)


@pytest.mark.parametrize("objective", ["clm", "slm"])
def test_step_normalization_is_token_weighted_over_micro_steps(objective):
    """Gradient of the micro-step losses (DeepSpeed divides each by grad_accum) = gradient of one batch, for
    micro-steps with different numbers of labelled tokens (sequence scope: the selection is per row either way)."""
    from megaslm.loss.objective import plan_step

    token_loss, ref_loss, valid, _ = _batch(10, rows=4, cols=8)
    valid[0, :7] = False
    halves = (slice(0, 2), slice(2, 4))
    norm = plan_step([valid[h] for h in halves], weighting="topk" if objective == "slm" else "clm", ratio=0.5,
                     scope="sequence")
    total = sum(compute_objective(token_loss[h], ref_loss[h], valid[h],
                                  objective=Objective(objective, scope="sequence"), ratio=0.5,
                                  step=norm)[0] / 2 for h in halves)
    whole, _ = compute_objective(token_loss, ref_loss, valid, objective=Objective(objective, scope="sequence"),
                                 ratio=0.5)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(_grad(total, token_loss), _grad(whole, token_loss))


_SYNCS = ("item", "tolist", "__bool__", "nonzero", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("weighting", ["topk", "soft", "cvar"])
@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_objective_and_step_plan_make_no_host_sync(weighting, scope, monkeypatch):
    """Planning a step and every micro-step of the objective wait for nothing on the device (the tensor methods
    that would are counted while they run); the figures reach the host in one transfer afterwards, equal to a
    one-micro-step objective's."""
    from megaslm.loss import Metrics

    token_loss, ref_loss, valid, source = _batch(11, rows=4, cols=9)
    obj = Objective("slm", weighting=weighting, score="excess", scope=scope)
    halves = (slice(0, 2), slice(2, 4))
    calls = []
    for name in _SYNCS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: (calls.append(_n),
                                                                                           _real(self, *a, **k))[1])
    norm = obj.plan_step([valid[h] for h in halves], 0.4)
    parts = [obj(token_loss[h], valid[h], ratio=0.4, ref_loss=ref_loss[h], step=norm, source=source[h],
                 num_sources=3) for h in halves]
    monkeypatch.undo()
    assert calls == []
    stats = [m for _, m in parts]
    assert all(m.on_device for m in stats)
    Metrics.resolve_all(stats)
    for (_, m), h in zip(parts, halves):
        _, alone = compute_objective(token_loss[h], ref_loss[h], valid[h], objective=obj, ratio=0.4,
                                     source=source[h], num_sources=3)
        assert dict(m) == dict(alone)


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_nan_score_voids_the_micro_step(scope):
    """A NaN score on a labelled token leaves no top k: the loss, its gradient and the loss figure are NaN (the skip
    guard drops the step), and the figures that rank the scores are left out instead of garbage."""
    token_loss, ref_loss, valid, _ = _batch(12)
    r, c = valid.nonzero()[0].tolist()
    ref_loss[r, c] = float("nan")
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope=scope), ratio=0.5)
    assert torch.isnan(loss) and torch.isnan(_grad(loss, token_loss)).any()  # so the grad norm is NaN too
    assert math.isnan(stats["loss"])
    assert not {"threshold", "excess_p10", "excess_p50", "excess_p90"} & stats.keys()
    # The same NaN on an unlabelled position is ignored.
    ref_loss[r, c] = 1.0
    ref_loss[~valid] = float("nan")
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective=Objective("slm", scope=scope), ratio=0.5)
    assert torch.isfinite(loss) and math.isfinite(stats["loss"]) and "threshold" in stats
