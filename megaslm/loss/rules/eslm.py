"""ESLM (arXiv 2505.19893, "Risk-Averse Selective Language Modeling"): reference-free, by predictive entropy.

- score `entropy`: the trained model's predictive entropy H(x_i) = -sum_v p(v | x_<i) log p(v | x_<i), from the
  same online softmax as its loss (megaslm/loss/per_token_ce.py, `with_entropy`: one more running sum per
  token; no full logits, vocab-parallel included). With `slm.weighting: topk` the step trains on the top
  `slm.ratio` tokens by entropy: ESLM's value-at-risk form (tokens at or above the (1 - ratio) quantile).
- weighting `cvar`: the conditional value-at-risk of the score's upper `ratio` tail, exact on a finite batch
  (Rockafellar-Uryasev): weight 1 on tokens above the top-k threshold t and the remaining mass ratio * n -
  #(above) shared by the selected tokens tied at t, so sum(w) = ratio * n exactly (per row, rank or group, as the
  scope says) and is known from the label counts. It differs from topk by the fractional boundary token: topk
  keeps ceil(ratio * n) whole tokens. With `slm.score: loss` this is ESLM's CVaR loss minimization.
"""

from __future__ import annotations

from fractions import Fraction

from megaslm.loss.rules.rho1 import thresholds, top_k
from megaslm.loss.weights import Score, Weighting, Weights, register_score, register_weighting


@register_score
class Entropy(Score):
    name = "entropy"
    head_outputs = ("entropy",)

    def __call__(self, token_loss, ref_loss, head):
        return head["entropy"]


def _exact(ratio: float) -> float:
    return float(Fraction(repr(float(ratio))))  # ratio as written, as num_to_keep reads it


@register_weighting
class CVaR(Weighting):
    name = "cvar"

    def weights(self, score, valid, ratio, scope, group) -> Weights:
        import torch
        import torch.distributed as dist

        w = top_k(score, valid, ratio, scope, group)
        sel = w.selected
        t = thresholds(score, sel, scope, w.threshold)
        tied = sel & (score.detach().float() == t)
        dims = dict(dim=1, keepdim=True) if scope == "sequence" else {}
        counts = torch.stack([valid.sum(**dims), sel.sum(**dims), tied.sum(**dims)]).double()
        if scope == "global" and group is not None:
            dist.all_reduce(counts, group=group)  # sync point: the tail mass is over the whole group
        n, k, c = counts[0], counts[1], counts[2]
        # k - c tokens lie strictly above t; the tied ones share what is left of ratio * n.
        share = torch.where(c > 0, (_exact(ratio) * n - (k - c)) / c.clamp_min(1), 0.0).float()
        weights = torch.where(tied, share, sel.float())
        return Weights(weights, sel, w.threshold, w.quantiles, w.n_nan)

    def local_mass(self, ratio, scope, row_counts):
        return _exact(ratio) * row_counts.sum().double()

    def global_mass(self, ratio, scope, n_valid, summed_local):
        return _exact(ratio) * n_valid
