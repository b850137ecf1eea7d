"""compute_objective in one process, against losses and gradients computed by hand."""

import math

import pytest
import torch

from megaslm.loss import compute_objective


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
    loss, stats = compute_objective(token_loss, None, valid, objective="clm", ratio=0.3, scope="global",
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
    clm, clm_stats = compute_objective(token_loss, None, valid, objective="clm", ratio=1.0, scope=scope)
    slm, stats = compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=1.0, scope=scope)
    torch.testing.assert_close(slm, clm)
    torch.testing.assert_close(_grad(slm, token_loss), _grad(clm, token_loss))
    assert stats["loss"] == pytest.approx(clm_stats["loss"])
    assert stats["selected_frac"] == 1.0 and "loss_unselected" not in stats


def test_slm_global_matches_hand_selection_and_stats():
    token_loss, ref_loss, valid, source = _batch(2, rows=4, cols=10)
    ratio = 0.6
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=ratio, scope="global",
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
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=0.5, scope="sequence")
    excess = token_loss.detach() - ref_loss
    top = excess.topk(3, dim=1).indices
    chosen = torch.zeros_like(valid).scatter_(1, top, True)
    torch.testing.assert_close(loss, token_loss[chosen].mean())
    assert stats["n_selected"] == 9


def test_no_valid_tokens_gives_zero_loss_and_no_means():
    token_loss, ref_loss, valid, _ = _batch(4)
    valid[:] = False
    for objective in ("clm", "slm"):
        loss, stats = compute_objective(token_loss, ref_loss, valid, objective=objective, ratio=0.5,
                                        scope="global")
        assert loss.item() == 0.0 and (_grad(loss, token_loss) == 0).all()
        assert stats["n_valid"] == 0 and "loss" not in stats and "loss_all" not in stats
        assert all(math.isfinite(v) for v in stats.values())


def test_non_finite_unselected_losses_do_not_leak():
    token_loss, ref_loss, valid, _ = _batch(5)
    with torch.no_grad():
        token_loss[~valid] = float("nan")
    loss, stats = compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=0.5, scope="rank")
    assert torch.isfinite(loss) and torch.isfinite(_grad(loss, token_loss)).all()
    assert all(math.isfinite(v) for v in stats.values())


def test_bad_arguments():
    token_loss, ref_loss, valid, _ = _batch()
    with pytest.raises(ValueError, match="objective"):
        compute_objective(token_loss, ref_loss, valid, objective="dpo", ratio=0.5, scope="global")
    with pytest.raises(ValueError, match="ratio"):
        compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=0.0, scope="global")
    with pytest.raises(ValueError, match="scope"):
        compute_objective(token_loss, ref_loss, valid, objective="slm", ratio=0.5, scope="node")
    with pytest.raises(ValueError, match="ref_loss"):
        compute_objective(token_loss, None, valid, objective="slm", ratio=0.5, scope="global")
