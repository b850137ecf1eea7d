"""The two kinds of objective component, their call shapes and their registries.

A *score* ranks the tokens (Rho-1's excess loss, the model's own loss, its predictive entropy, ...); a
*weighting* turns scores into token weights `w [B, T]` (0 on tokens without a label). The objective then
minimises `sum(w_i * loss_i) / sum(w_i)` over the optimizer step, one shared normalization for every
weighting (megaslm/loss/objective.py). Each component is a small class registered by name that owns its config
fields (their validation), what it needs (a reference, extra loss-head outputs), its weights, its step mass and
its metrics. The concrete components live in megaslm/loss/rules/, one module per rule, imported automatically:
a new rule is a new module there plus its test, and the config's choices are these registries' names.

    Score:     score(token_loss, ref_loss, head) -> [B, T]         (detached floats; head: extra head outputs)
    Weighting: weights(score, valid, ratio, scope, group) -> Weights
               local_mass(ratio, scope, row_counts) / global_mass(ratio, scope, n_valid, summed_local)
                                                                  (device tensors: no host sync)
               sums(weights, valid) -> {name: 0-dim float64}      (summed over the dp group with the others)
               metrics(m, sums)                                   (its own figures, from the summed values)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # torch-free at import: the config checks read these registries
    import torch

SCORE_QUANTILES = (0.1, 0.5, 0.9)  # logged as <score>_p10/p50/p90 (excess_p50 for Rho-1)


@dataclass
class Weights:
    weights: torch.Tensor  # float [B, T], 0 where not valid
    selected: torch.Tensor  # bool [B, T]: the top-k tokens (== valid for clm)
    # Device tensors (nothing here waits for the device): the score of the k-th selected token (local scopes: the
    # lowest selected), float64 []; the quantiles of the valid scores at SCORE_QUANTILES, float64 [3]; the labelled
    # tokens with a NaN score, int64 [] (> 0 voids the step: its loss becomes NaN and the skip guard drops it).
    threshold: torch.Tensor | None = None
    quantiles: torch.Tensor | list = field(default_factory=list)
    n_nan: torch.Tensor | None = None


class Score:
    """How tokens are ranked. `needs_reference`: it reads ref_loss (a reference is loaded, ref_loss is logged);
    `head_outputs`: extra per-token outputs it needs from the loss head (e.g. "entropy")."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    head_outputs: ClassVar[tuple[str, ...]] = ()
    missing_reference: ClassVar[tuple[str, str]] = ("reference.path", "is required")  # (key, message)

    @classmethod
    def validate(cls, cfg, bad) -> None:
        """Config checks of this score (cfg: the whole Config; bad(key, msg) -> UserError). By default: a score
        that reads a reference needs one (any reference source, megaslm/reference/sources/) under objective slm."""
        from megaslm.reference.sources import has_reference

        if cls.needs_reference and cfg.objective == "slm" and not has_reference(cfg):
            raise bad(*cls.missing_reference)

    def __call__(self, token_loss: torch.Tensor, ref_loss: torch.Tensor | None, head: dict) -> torch.Tensor:
        raise NotImplementedError


class Weighting:
    """How scores become weights. `mass_known`: sum(w) follows from the label counts (local_mass/global_mass),
    so a step is normalised by one number known before any forward; else each micro-step by its own sum."""

    name: ClassVar[str]
    mass_known: ClassVar[bool] = True

    def __init__(self, slm=None):
        """slm: the config's slm section (or any object with the fields this weighting reads)."""

    @classmethod
    def validate(cls, slm, bad) -> None:
        """Config checks of the fields this weighting owns (bad(key, msg) -> UserError)."""

    def weights(self, score, valid, ratio: float, scope: str, group) -> Weights:
        raise NotImplementedError

    def local_mass(self, ratio: float, scope: str, row_counts: torch.Tensor) -> torch.Tensor | float | None:
        """This rank's part of sum(w) from its labelled tokens per row (None: not known from counts). Computed on
        the device (row_counts: int64 [B]), so that planning a step waits for nothing."""
        return None

    def global_mass(self, ratio: float, scope: str, n_valid: torch.Tensor,
                    summed_local: torch.Tensor) -> torch.Tensor | None:
        """sum(w) over the data-parallel group for one micro-step, from the all-reduced counts (0-dim float64
        device tensors: the group's labelled tokens and the sum of the ranks' local_mass)."""
        return summed_local if self.mass_known else None

    def sums(self, w: Weights, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    def metrics(self, m, sums: dict) -> None:
        pass


WEIGHTINGS: dict[str, type[Weighting]] = {}
SCORES: dict[str, type[Score]] = {}


def register_weighting(cls: type[Weighting]) -> type[Weighting]:
    WEIGHTINGS[cls.name] = cls
    return cls


def register_score(cls: type[Score]) -> type[Score]:
    SCORES[cls.name] = cls
    return cls
