"""ssToken's retrospective excess loss (megaslm/loss/rules/sstoken.py): the score, its selection and its config."""

import math

import pytest
import torch

from megaslm.config import from_dict
from megaslm.errors import UserError
from megaslm.loss import Objective, compute_objective


def _batch(seed=0, rows=4, cols=10):
    g = torch.Generator().manual_seed(seed)
    token_loss = (torch.rand(rows, cols, generator=g) * 4).requires_grad_()
    history = torch.rand(rows, cols, generator=g) * 4
    valid = torch.rand(rows, cols, generator=g) < 0.8
    return token_loss, history, valid


@pytest.mark.parametrize("scope", ["sequence", "global"])
def test_keeps_the_tokens_the_model_improved_on_most(scope):
    token_loss, history, valid = _batch()
    ratio = 0.4
    loss, stats = compute_objective(token_loss, history, valid,
                                    objective=Objective("slm", scope=scope, score="retrospective"), ratio=ratio)
    rel = history - token_loss.detach()
    groups = [[(r, c) for c in range(rel.shape[1])] for r in range(rel.shape[0])] if scope == "sequence" else \
        [[(r, c) for r in range(rel.shape[0]) for c in range(rel.shape[1])]]
    chosen = torch.zeros_like(valid)
    for cells in groups:
        ids = [i for i, rc in enumerate(cells) if valid[rc]]
        ids.sort(key=lambda i: (-rel[cells[i]].item(), i))
        for i in ids[:math.ceil(ratio * len(ids) - 1e-9)]:
            chosen[cells[i]] = True
    torch.testing.assert_close(loss, token_loss[chosen].mean())
    assert stats["ref_loss"] == pytest.approx(history[valid].double().mean().item())
    # The opposite sign of Rho-1's excess loss: the two rules pick different tokens here.
    _, rho1 = compute_objective(token_loss, history, valid, objective=Objective("slm", scope=scope), ratio=ratio)
    assert rho1["loss_selected"] != pytest.approx(stats["loss_selected"])
    with pytest.raises(ValueError, match="retrospective"):
        compute_objective(token_loss, None, valid, objective=Objective("slm", score="retrospective"), ratio=ratio)


BASE = {"run": {"dir": "/r"}, "data": {"train": "/d"}, "objective": "slm", "slm": {"score": "retrospective"}}


def test_the_history_model_is_the_reference():
    from megaslm.reference import needs_reference

    with pytest.raises(UserError, match="reference.ema_decay or reference.path is required"):
        from_dict(BASE)
    ema = from_dict({**BASE, "reference": {"ema_decay": 0.99}})
    fixed = from_dict({**BASE, "reference": {"path": "/base-model"}})
    assert needs_reference(ema) and needs_reference(fixed)
    assert not needs_reference(from_dict({**BASE, "objective": "clm"}))
