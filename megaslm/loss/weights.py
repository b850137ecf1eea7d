"""Objectives as token-weight functions: one call shape, registered by name.

A weighting turns per-token scores into weights `w [B, T]` (0 on tokens without a label); the objective then
minimises `sum(w_i * loss_i) / sum(w_i)` over the global batch, one shared normalization for every weighting
(megaslm/loss/objective.py). A new variant is a function added to `WEIGHTINGS`, not a branch in the objective.

    fn(score, valid, ratio, scope, temperature, group) -> Weights

- clm:  w = valid (every labelled token), no selection at all.
- topk: the exact Rho-1 top-k mask of megaslm.loss.selection (k = ceil(ratio * n_valid) per scope, the
        deterministic tie rule), as 0/1 weights.
- soft: w = sigmoid((score - t) / temperature) on labelled tokens, t the threshold top-k would use (the score of
        the k-th selected token: global over the data-parallel group, per row for scope "sequence", per rank
        for "rank"). As temperature -> 0 it tends to the top-k mask (the k-th token itself gets 1/2).

`mass_from_counts` says what sum(w) is before any forward (clm: n_valid, topk: k; soft: unknown, None): the
trainer uses it to normalise the gradient of a whole optimizer step by one token count.

Scores (`SCORES`): "excess" = token_loss - ref_loss (Rho-1), "loss" = the trained model's own token_loss
(reference-free, ESLM-style).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .selection import num_to_keep, select_with_quantiles

EXCESS_QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class Weights:
    weights: torch.Tensor  # float [B, T], 0 where not valid
    selected: torch.Tensor  # bool [B, T]: the top-k tokens (== valid for clm)
    threshold: float | None = None  # score of the k-th selected token (local scopes: the lowest selected)
    quantiles: list[float] = field(default_factory=list)  # of the valid scores, at EXCESS_QUANTILES


WeightFn = Callable[..., Weights]
WEIGHTINGS: dict[str, WeightFn] = {}
SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "excess": lambda token_loss, ref_loss: token_loss - ref_loss,
    "loss": lambda token_loss, ref_loss: token_loss,
}
NEEDS_REFERENCE = {"excess": True, "loss": False}


def register(name: str) -> Callable[[WeightFn], WeightFn]:
    def add(fn: WeightFn) -> WeightFn:
        WEIGHTINGS[name] = fn
        return fn
    return add


@register("clm")
def clm_weights(score, valid, ratio, scope, temperature, group) -> Weights:
    return Weights(valid.float(), valid)


@register("topk")
def topk_weights(score, valid, ratio, scope, temperature, group) -> Weights:
    mask, threshold, quantiles = select_with_quantiles(score, valid, ratio, scope, EXCESS_QUANTILES, group)
    return Weights(mask.float(), mask, threshold, quantiles)


@register("soft")
def soft_weights(score, valid, ratio, scope, temperature, group) -> Weights:
    if not temperature > 0:
        raise ValueError(f"soft weighting needs a temperature > 0, got {temperature!r}")
    mask, threshold, quantiles = select_with_quantiles(score, valid, ratio, scope, EXCESS_QUANTILES, group)
    t = _thresholds(score, mask, scope, threshold)
    w = torch.sigmoid((score.detach().float() - t) / temperature)
    return Weights(torch.where(valid, w, 0.0), mask, threshold, quantiles)


def _thresholds(score: torch.Tensor, mask: torch.Tensor, scope: str, threshold: float) -> torch.Tensor | float:
    """The threshold each token is compared with: one value for "global", per row / per rank otherwise."""
    if scope == "global":
        return threshold
    s = torch.where(mask, score.detach().float(), math.inf)
    t = s.amin(dim=1, keepdim=True) if scope == "sequence" else s.amin()
    return torch.where(torch.isinf(t), 0.0, t)  # a row with nothing selected has no valid token either


def mass_from_counts(weighting: str, ratio: float, scope: str, row_counts: torch.Tensor) -> float | None:
    """This rank's part of sum(w) known from the label counts alone (row_counts: labelled tokens per row), or
    None when the weights depend on the losses (soft). For scope "global" the caller applies num_to_keep to the
    all-reduced count instead (`global_mass`)."""
    if weighting == "clm":
        return float(row_counts.sum())
    if weighting != "topk":
        return None
    if scope == "sequence":
        return float(sum(num_to_keep(ratio, int(n)) for n in row_counts.tolist()))
    if scope == "rank":
        return float(num_to_keep(ratio, int(row_counts.sum())))
    return 0.0  # global: known only after the all-reduce of the counts


def global_mass(weighting: str, ratio: float, scope: str, n_valid: int, summed_local: float) -> float | None:
    """sum(w) over the data-parallel group for one micro-step, from the all-reduced counts."""
    if weighting == "topk" and scope == "global":
        return float(num_to_keep(ratio, n_valid))
    if weighting == "clm":
        return float(n_valid)
    return summed_local if weighting == "topk" else None
