"""Rho-1's rules (arXiv 2404.07965) and the reference-free loss score.

Weightings:
- topk: the exact top-k mask of megaslm.loss.selection (k = ceil(ratio * n_valid) per scope, the deterministic
        tie rule), as 0/1 weights; sum(w) = the k's, known from the label counts before any forward.
- soft: w = sigmoid((score - t) / slm.temperature) on labelled tokens, t the threshold top-k would use (the
        score of the k-th selected token: global over the data-parallel group, per row for scope "sequence",
        per rank for "rank"). As the temperature -> 0 it tends to the top-k mask (the k-th token itself gets 1/2).
Scores: excess = token_loss - ref_loss (Rho-1); loss = the trained model's own token_loss (no reference).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megaslm.loss.weights import (SCORE_QUANTILES, Score, Weighting, Weights, register_score,
                                  register_weighting)

if TYPE_CHECKING:
    import torch


def top_k(score, valid, ratio, scope, group) -> Weights:
    """The top-k mask as 0/1 weights, with its threshold and the score quantiles (shared by the weightings); all
    on the device."""
    from megaslm.loss.selection import select_on_device

    sel = select_on_device(score, valid, ratio, scope, SCORE_QUANTILES, group)
    return Weights(sel.mask.float(), sel.mask, sel.threshold, sel.quantiles, sel.n_nan)


def thresholds(score: torch.Tensor, mask: torch.Tensor, scope: str, threshold: torch.Tensor) -> torch.Tensor:
    """The threshold each token is compared with: one value for "global", per row / per rank otherwise."""
    if scope == "global":
        return threshold
    import torch

    s = torch.where(mask, score.detach().float(), math.inf)
    t = s.amin(dim=1, keepdim=True) if scope == "sequence" else s.amin()
    return torch.where(torch.isinf(t), 0.0, t)  # a row with nothing selected has no valid token either


@register_weighting
class TopK(Weighting):
    name = "topk"

    def weights(self, score, valid, ratio, scope, group) -> Weights:
        return top_k(score, valid, ratio, scope, group)

    def local_mass(self, ratio, scope, row_counts):
        from megaslm.loss.selection import keep_count

        if scope == "sequence":
            return keep_count(ratio, row_counts).sum().double()
        if scope == "rank":
            return keep_count(ratio, row_counts.sum()).double()
        return 0.0  # global: known only after the all-reduce of the counts

    def global_mass(self, ratio, scope, n_valid, summed_local):
        from megaslm.loss.selection import keep_count

        return keep_count(ratio, n_valid).double() if scope == "global" else summed_local


@register_weighting
class Soft(Weighting):
    name = "soft"
    mass_known = False

    def __init__(self, slm=None):
        self.temperature = getattr(slm, "temperature", 0.5)
        if not self.temperature > 0:
            raise ValueError(f"soft weighting needs a temperature > 0, got {self.temperature!r}")

    @classmethod
    def validate(cls, slm, bad) -> None:
        if not slm.temperature > 0:
            raise bad("slm.temperature", f"must be > 0, got {slm.temperature}")

    def weights(self, score, valid, ratio, scope, group) -> Weights:
        import torch

        w = top_k(score, valid, ratio, scope, group)
        t = thresholds(score, w.selected, scope, w.threshold)
        soft = torch.sigmoid((score.detach().float() - t) / self.temperature)
        return Weights(torch.where(valid, soft, 0.0), w.selected, w.threshold, w.quantiles, w.n_nan)

    def sums(self, w, valid):
        import torch

        wd = w.weights.double()
        return {"wlogw": torch.where(wd > 0, wd * torch.log(wd.clamp_min(1e-300)), 0.0).sum()}

    def metrics(self, m, sums):
        import torch

        from megaslm.loss.metrics import present

        m.ratio("effective_frac", sums["w"], sums["n_valid"])
        W = sums["w"]  # entropy of p = w / W: log W - sum(w log w) / W, where W > 0
        m.mean("weight_entropy", *present(W > 0, torch.log(W) - sums["wlogw"] / W))


@register_score
class Excess(Score):
    name = "excess"
    needs_reference = True
    missing_reference = ("reference.path", "is required when objective is slm with slm.score excess (or "
                         "reference.cache or reference.ema_decay)")

    def __call__(self, token_loss, ref_loss, head):
        return token_loss - ref_loss


@register_score
class OwnLoss(Score):
    name = "loss"

    def __call__(self, token_loss, ref_loss, head):
        return token_loss
