"""The training objective the trainer calls once per micro-step: an `Objective` built once from the config (a
weighting and a score from megaslm/loss/rules/) and one shared normalization, exact across data-parallel ranks
and across gradient-accumulation micro-steps.

Normalization. For weights w (clm: every labelled token, topk: the selected ones, soft: sigmoid weights) the
step minimises sum(w_i * loss_i) / sum(w_i) over every token of the optimizer step: all data-parallel ranks and
all `grad_accum` micro-steps. DeepSpeed divides each micro-step's loss by grad_accum and averages gradients over
the dp ranks, so each rank's micro-step loss is scaled by dp_size * grad_accum / W_step; with W_step known before
any forward (`plan_step`: one all-reduce of the label counts of the step's batches) the step's gradient equals the
gradient of one big batch, also when micro-steps hold different numbers of labelled tokens (loss masks).
Top-k's k is per micro-step (the selection is over the global micro-batch), so W_step = sum of the k's.
Soft weights depend on the losses, so W_step is not known in advance: each micro-step is normalised by its own
weight sum W_m and weighted by its share of the step's labelled tokens, n_m / N_step. That is the big-batch
gradient whenever the mean weight per labelled token is the same in every micro-step, and token-weighted always.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import rules
from .choices import OBJECTIVES, SCOPES
from .metrics import Metrics, objective_metrics
from .selection import check_ratio, resolve_group
from .weights import SCORE_QUANTILES, Score, Weighting, Weights

__all__ = ["OBJECTIVES", "SCORE_QUANTILES", "Objective", "StepNorm", "plan_step", "compute_objective",
           "slm_ratio"]


class _Every(Weighting):
    """CLM: weight 1 on every labelled token (no selection)."""
    name = "clm"

    def weights(self, score, valid, ratio, scope, group) -> Weights:
        return Weights(valid.float(), valid)

    def local_mass(self, ratio, scope, row_counts):
        return row_counts.sum().double()

    def global_mass(self, ratio, scope, n_valid, summed_local):
        return n_valid


@dataclass(frozen=True)
class StepNorm:
    """How the micro-steps of one optimizer step are normalised; identical on every rank."""
    micro_steps: int
    n_valid: torch.Tensor  # float64 []: labelled tokens of the whole step, all ranks (on the device)
    mass: torch.Tensor | None  # float64 []: sum of the step's weights, all ranks (None: not known before the forwards)


class Objective:
    """What a run optimises, built once: `kind` "clm" (every labelled token) or "slm" (`weighting` of `score`
    within `scope`). Calling it gives (loss to backpropagate, Metrics) for one micro-batch of one rank."""

    def __init__(self, kind: str = "clm", *, weighting: str = "topk", score: str = "excess",
                 scope: str = "global", slm=None):
        if kind not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {kind!r}")
        self.kind, self.scope = kind, scope
        self.score: Score | None = None
        if kind == "clm":
            self.weighting: Weighting = _Every()
            return
        if scope not in SCOPES:
            raise ValueError(f"selection scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if weighting not in rules.WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(rules.WEIGHTINGS)}, got {weighting!r}")
        if score not in rules.SCORES:
            raise ValueError(f"score must be one of {', '.join(rules.SCORES)}, got {score!r}")
        self.weighting = rules.WEIGHTINGS[weighting](slm)
        self.score = rules.SCORES[score]()

    @classmethod
    def from_config(cls, cfg) -> Objective:
        s = cfg.slm
        return cls(cfg.objective, weighting=s.weighting, score=s.score, scope=s.scope, slm=s)

    @property
    def needs_reference(self) -> bool:
        return self.score is not None and self.score.needs_reference

    @property
    def head_outputs(self) -> tuple[str, ...]:
        """Per-token outputs the score needs from the loss head beside the loss (e.g. ("entropy",))."""
        return self.score.head_outputs if self.score is not None else ()

    def plan_step(self, valids: list[torch.Tensor], ratio: float, dp_group=None) -> StepNorm:
        return plan_step(valids, weighting=self.weighting, ratio=ratio, scope=self.scope, dp_group=dp_group)

    def __call__(self, token_loss, valid, *, ratio: float, ref_loss=None, head: dict | None = None, dp_group=None,
                 step: StepNorm | None = None, source=None, num_sources: int = 0, stop_requested=None):
        """token_loss: [B, T] float32 per-token CE with grad (0 where not valid); valid: [B, T] bool labelled
        tokens; ref_loss: [B, T] reference losses (scores that need one); head: extra loss-head outputs
        ({"entropy": [B, T]}, scores that ask for them). See `compute_objective` for the rest."""
        self._check(token_loss, ref_loss, head or {}, valid, source, ratio)
        group = resolve_group(dp_group)
        dp_size = dist.get_world_size(group) if group is not None else 1
        valid = valid.bool()
        scores = token_loss.detach().float()
        if self.score is not None:
            ref = None if ref_loss is None else ref_loss.detach().float()
            scores = self.score(scores, ref, {k: v.detach().float() for k, v in (head or {}).items()})
        w = self.weighting.weights(scores, valid, ratio, self.scope, group)

        # where(), not a product: a NaN/inf on a zero-weight position must not reach the sum or its gradient.
        live = valid & (w.weights > 0)
        weighted_sum = torch.where(live, token_loss * w.weights, 0.0).sum()

        sums = _global_sums(token_loss, ref_loss if self.needs_reference else None, valid, w,
                            self.weighting.sums(w, valid), source, num_sources, group, stop_requested)
        w_micro, n_micro = sums["w"], sums["n_valid"]  # float64 on the device: no host sync per micro-step
        if "n_nan" in sums:
            # A NaN score leaves no top k: the loss (and so every gradient) becomes NaN, on every rank at once (the
            # count is all-reduced with the sums), and the skip guard drops the step. No host sync decides it.
            weighted_sum = weighted_sum * torch.where(sums["n_nan"] > 0, torch.nan, 1.0).float()
        if step is None:
            step = StepNorm(1, n_micro, w_micro if self.weighting.mass_known else None)
        # DeepSpeed divides by grad_accum and averages over the dp ranks: undo both, then divide by the step's mass.
        scale = dp_size * step.micro_steps
        if step.mass is not None:
            factor = _ratio(scale, step.mass)
        else:
            factor = _ratio(scale * n_micro, w_micro * step.n_valid)
        # A float64 factor taken to float32 multiplies as the same Python float would: the same bits as on the host.
        loss = weighted_sum * (factor.float() if isinstance(factor, torch.Tensor) else factor)
        return loss, objective_metrics(sums, w, self, group, num_sources)

    def _check(self, token_loss, ref_loss, head, valid, source, ratio) -> None:
        if token_loss.dim() != 2 or token_loss.shape != valid.shape:
            raise ValueError(f"token_loss {tuple(token_loss.shape)} and valid {tuple(valid.shape)} must both be "
                             "[B, T]")
        if source is not None and source.shape != token_loss.shape:
            raise ValueError(f"source {tuple(source.shape)} must match token_loss {tuple(token_loss.shape)}")
        if self.score is None:
            return
        check_ratio(ratio)
        name = self.score.name
        if self.needs_reference and (ref_loss is None or ref_loss.shape != token_loss.shape):
            raise ValueError(f"objective 'slm' with score {name!r} needs ref_loss shaped like token_loss")
        for key in self.score.head_outputs:
            if key not in head or head[key].shape != token_loss.shape:
                raise ValueError(f"objective 'slm' with score {name!r} needs the loss head's {key!r} shaped like "
                                 "token_loss")


def plan_step(valids: list[torch.Tensor], *, weighting: str | Weighting, ratio: float, scope: str,
              dp_group: dist.ProcessGroup | None = None) -> StepNorm:
    """The StepNorm of the micro-batches `valids` ([B, T] bool each, this rank's, in micro-step order).
    One all-reduce for the whole step and no host sync; every rank of dp_group must call it together."""
    if isinstance(weighting, str):
        weighting = _Every() if weighting == "clm" else rules.WEIGHTINGS[weighting]()
    group = resolve_group(dp_group)
    dev = valids[0].device
    local = []
    for v in valids:
        rows = v.bool().sum(dim=1)
        m = weighting.local_mass(ratio, scope, rows)
        local += [rows.sum().double(), torch.as_tensor(0.0 if m is None else m, dtype=torch.float64, device=dev)]
    sums = torch.stack(local)
    if group is not None:
        dist.all_reduce(sums, group=group)  # sync point: the step's normaliser is global (it stays on the device)
    counts = sums.view(-1, 2).unbind()
    masses = [weighting.global_mass(ratio, scope, nm[0], nm[1]) for nm in counts]
    # Python's sum: the micro-steps' masses add left to right, in the order (and so to the bits) of host floats.
    mass = None if any(m is None for m in masses) else sum(masses)
    return StepNorm(len(valids), sum(nm[0] for nm in counts), mass)


def slm_ratio(ratio: float, step: int, start_step: int = 0, warmup_steps: int = 0) -> float | None:
    """The selection ratio of optimizer step `step` (0-based: the step about to be taken), or None while the run
    is still plain CLM (step < start_step). After the start the ratio goes linearly from 1.0 towards `ratio`,
    reaching it at step start_step + warmup_steps - 1."""
    if step < start_step:
        return None
    if warmup_steps <= 0:
        return ratio
    frac = min(1.0, (step - start_step + 1) / warmup_steps)
    return 1.0 + (ratio - 1.0) * frac


def compute_objective(token_loss, ref_loss, valid, *, objective: Objective, ratio: float, dp_group=None,
                      source=None, num_sources: int = 0, step: StepNorm | None = None,
                      stop_requested: bool | None = None, head: dict | None = None) -> tuple[torch.Tensor, Metrics]:
    """(loss to backpropagate, metrics) for one micro-batch of one data-parallel rank: `objective` (an Objective:
    its kind, weighting, score and scope; `Objective.from_config(cfg)`) of the tensors.

    token_loss: [B, T] float32 per-token CE with grad (0 where not valid); ref_loss: [B, T] reference losses (no
    grad; scores with needs_reference, else ignored); valid: [B, T] bool labelled tokens; head: extra loss-head
    outputs. dp_group: the data-parallel group (default: the world when torch.distributed is initialized); every
    rank calls this together. step: the optimizer step's StepNorm (default: this micro-step alone). source:
    optional [B, T] long source index of each token.

    Metrics (a `Metrics`: identical on every rank, global micro-batch, each with its reduction): loss (weighted
    mean CE), loss_all, n_valid; for "slm" also loss_selected, loss_unselected (omitted when every valid token is
    selected), ref_loss (scores with a reference), selected_frac, n_selected, threshold, <score>_p10/p50/p90
    (quantiles of the score: excess_p50 for Rho-1, loss_p50, entropy_p50, ...); each weighting adds its own
    (soft: effective_frac, weight_entropy). Means over no tokens are omitted rather than NaN. With `source`:
    tokens/<i>, and (slm) selected_frac/<i>.
    stop_requested: this rank's stop flag, summed over dp_group in the same all-reduce as the metrics (the
    trainer's per-step stop check costs no collective of its own); the count of ranks that asked comes back as
    stats["stop_requested"]. Every rank of dp_group passes one or none.
    """
    loss, metrics = objective(token_loss, valid, ratio=ratio, ref_loss=ref_loss, head=head, dp_group=dp_group,
                              step=step, source=source, num_sources=num_sources, stop_requested=stop_requested)
    return loss, metrics.resolved()


def _ratio(num, den):
    """num / den where den > 0, else 0 (host numbers, or 0-dim device tensors)."""
    if isinstance(num, torch.Tensor) or isinstance(den, torch.Tensor):
        return torch.where(torch.as_tensor(den) > 0, num / den, 0.0)
    return num / den if den > 0 else 0.0


def _global_sums(token_loss, ref_loss, valid, w, extra, source, num_sources, group, stop_requested):
    """Every sum the metrics and the normalization need, in one all-reduce (float64: counts stay exact)."""
    loss_d = token_loss.detach().double()
    wd, sel = w.weights.double(), w.selected
    parts = {
        "wl": torch.where(valid & (wd > 0), wd * loss_d, 0.0).sum(),
        "w": wd.sum(),
        "sel_loss": torch.where(sel, loss_d, 0.0).sum(),
        "n_sel": sel.sum().double(),
        "all_loss": torch.where(valid, loss_d, 0.0).sum(),
        "n_valid": valid.sum().double(),
    }
    if ref_loss is not None:
        parts["ref"] = torch.where(valid, ref_loss.detach().double(), 0.0).sum()
    if w.n_nan is not None:
        parts["n_nan"] = w.n_nan.double()  # global scope: already the group's; summed by each rank below
    parts.update(extra)
    if stop_requested is not None:
        parts["stop_requested"] = wd.new_tensor(float(stop_requested))
    layout = list(parts)
    vec = torch.stack(list(parts.values()))
    if source is not None and num_sources > 0:
        src = torch.where(valid & (source >= 0) & (source < num_sources), source, num_sources)
        src_valid = torch.bincount(src.reshape(-1), minlength=num_sources + 1)[:num_sources]
        src_sel = torch.bincount(src[sel], minlength=num_sources + 1)[:num_sources]
        vec = torch.cat([vec, src_valid.double(), src_sel.double()])
    if group is not None:
        dist.all_reduce(vec, group=group)  # normaliser and metrics are global (stays on the device: no host sync)
    sums = dict(zip(layout, vec.unbind()))
    sums["_sources"] = vec[len(layout):]
    return sums
