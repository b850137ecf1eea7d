"""The training objective the trainer calls once per micro-step: a token-weight function (megaslm/loss/weights.py)
and one shared normalization, exact across data-parallel ranks and across gradient-accumulation micro-steps.

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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .metrics import Metrics
from .selection import SCOPES, check_ratio, resolve_group
from .weights import EXCESS_QUANTILES, NEEDS_REFERENCE, SCORES, WEIGHTINGS, global_mass, mass_from_counts

OBJECTIVES = ("clm", "slm")
__all__ = ["OBJECTIVES", "EXCESS_QUANTILES", "StepNorm", "plan_step", "compute_objective", "slm_ratio"]


@dataclass(frozen=True)
class StepNorm:
    """How the micro-steps of one optimizer step are normalised; identical on every rank."""
    micro_steps: int
    n_valid: float  # labelled tokens of the whole step, all ranks
    mass: float | None  # sum of the weights of the whole step, all ranks (None: not known before the forwards)


def plan_step(valids: list[torch.Tensor], *, weighting: str, ratio: float, scope: str,
              dp_group: dist.ProcessGroup | None = None) -> StepNorm:
    """The StepNorm of the micro-batches `valids` ([B, T] bool each, this rank's, in micro-step order).
    One all-reduce for the whole step; every rank of dp_group must call it together."""
    group = resolve_group(dp_group)
    local = []
    for v in valids:
        rows = v.bool().sum(dim=1)
        m = mass_from_counts(weighting, ratio, scope, rows)
        local += [float(rows.sum()), m if m is not None else 0.0]
    sums = torch.tensor(local, dtype=torch.float64, device=valids[0].device)
    if group is not None:
        dist.all_reduce(sums, group=group)  # sync point: the step's normaliser is global
    counts = sums.view(-1, 2).tolist()
    masses = [global_mass(weighting, ratio, scope, int(n), m) for n, m in counts]
    mass = None if any(m is None for m in masses) else float(sum(masses))
    return StepNorm(len(valids), float(sum(n for n, _ in counts)), mass)


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


def compute_objective(
    token_loss: torch.Tensor,
    ref_loss: torch.Tensor | None,
    valid: torch.Tensor,
    *,
    objective: str,
    ratio: float,
    scope: str,
    dp_group: dist.ProcessGroup | None = None,
    source: torch.Tensor | None = None,
    num_sources: int = 0,
    weighting: str = "topk",
    score: str = "excess",
    temperature: float = 1.0,
    step: StepNorm | None = None,
    stop_requested: bool | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """(loss to backpropagate, metrics) for one micro-batch of one data-parallel rank.

    token_loss: [B, T] float32 per-token CE with grad (0 where not valid); ref_loss: [B, T] reference losses (no
    grad; needed for objective "slm" with score "excess", else ignored); valid: [B, T] bool labelled tokens.
    objective "clm": every valid token, weight 1; "slm": `weighting` (topk | soft, see weights.py) of `score`
    (excess | loss) with `ratio`, `scope` and (soft) `temperature`. dp_group: the data-parallel group (default:
    the world when torch.distributed is initialized); every rank calls this together. step: the optimizer step's
    StepNorm (default: this micro-step alone). source: optional [B, T] long source index of each token.

    Metrics (a `Metrics`: identical on every rank, global micro-batch, each with its reduction): loss (weighted
    mean CE), loss_all, n_valid; for "slm" also loss_selected, loss_unselected (omitted when every valid token is
    selected), ref_loss (score excess), selected_frac, n_selected, threshold, excess_p10/p50/p90 (quantiles of the
    score); for soft also effective_frac (sum w / n_valid) and weight_entropy (nats, of w / sum w). Means over no
    tokens are omitted rather than NaN. With `source`: tokens/<i>, and (slm) selected_frac/<i>.
    stop_requested: this rank's stop flag, summed over dp_group in the same all-reduce as the metrics (the
    trainer's per-step stop check costs no collective of its own); the count of ranks that asked comes back as
    stats["stop_requested"]. Every rank of dp_group passes one or none.
    """
    name = _check(token_loss, ref_loss, valid, objective, ratio, scope, weighting, score, source)
    group = resolve_group(dp_group)
    dp_size = dist.get_world_size(group) if group is not None else 1
    valid = valid.bool()
    scores = token_loss.detach().float()
    if name != "clm":
        scores = SCORES[score](scores, None if ref_loss is None else ref_loss.detach().float())
    w = WEIGHTINGS[name](scores, valid, ratio, scope, temperature, group)

    # where(), not a product: a NaN/inf on a zero-weight position must not reach the sum or its gradient.
    live = valid & (w.weights > 0)
    weighted_sum = torch.where(live, token_loss * w.weights, 0.0).sum()

    sums, layout = _global_sums(token_loss, ref_loss, valid, w, name, score, source, num_sources, group,
                                stop_requested)
    w_micro, n_micro = sums["w"], sums["n_valid"]
    if step is None:
        step = StepNorm(1, n_micro, w_micro if name != "soft" else None)
    # DeepSpeed divides by grad_accum and averages over the dp ranks: undo both, then divide by the step's mass.
    scale = dp_size * step.micro_steps
    if step.mass is not None:
        loss = weighted_sum * (scale / step.mass) if step.mass > 0 else weighted_sum * 0.0
    elif w_micro > 0 and step.n_valid > 0:
        loss = weighted_sum * (scale * n_micro / (w_micro * step.n_valid))
    else:
        loss = weighted_sum * 0.0
    return loss, _metrics(sums, layout, w, name, objective, score, scope, group, num_sources)


def _check(token_loss, ref_loss, valid, objective, ratio, scope, weighting, score, source) -> str:
    """The weighting to apply ("clm" for objective clm); ValueError on bad arguments."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if token_loss.dim() != 2 or token_loss.shape != valid.shape:
        raise ValueError(f"token_loss {tuple(token_loss.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    if source is not None and source.shape != token_loss.shape:
        raise ValueError(f"source {tuple(source.shape)} must match token_loss {tuple(token_loss.shape)}")
    if objective == "clm":
        return "clm"
    check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"selection scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if weighting not in WEIGHTINGS or weighting == "clm":
        raise ValueError(f"weighting must be one of topk, soft, got {weighting!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if NEEDS_REFERENCE[score] and (ref_loss is None or ref_loss.shape != token_loss.shape):
        raise ValueError(f"objective 'slm' with score {score!r} needs ref_loss shaped like token_loss")
    return weighting


def _global_sums(token_loss, ref_loss, valid, w, name, score, source, num_sources, group, stop_requested):
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
    if name != "clm" and score == "excess":
        parts["ref"] = torch.where(valid, ref_loss.detach().double(), 0.0).sum()
    if name == "soft":
        parts["wlogw"] = torch.where(wd > 0, wd * torch.log(wd.clamp_min(1e-300)), 0.0).sum()
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
        dist.all_reduce(vec, group=group)  # sync point: normaliser and metrics are global
    values = vec.tolist()  # sync point: the normaliser is a Python float
    sums = dict(zip(layout, values))
    sums["_sources"] = values[len(layout):]
    return sums, layout


def _metrics(sums, layout, w, name, objective, score, scope, group, num_sources) -> Metrics:
    m = Metrics()
    m.total("n_valid", sums["n_valid"])
    if "stop_requested" in sums:
        m.total("stop_requested", sums["stop_requested"])
    m.ratio("loss", sums["wl"], sums["w"])
    m.ratio("loss_all", sums["all_loss"], sums["n_valid"])
    srcs = sums["_sources"]
    for i in range(num_sources if srcs else 0):
        m.total(f"tokens/{i}", srcs[i])
    if objective != "slm":
        return m
    n_sel, n_valid = sums["n_sel"], sums["n_valid"]
    m.total("n_selected", n_sel)
    m.ratio("loss_selected", sums["sel_loss"], n_sel)
    m.ratio("selected_frac", n_sel, n_valid)
    m.ratio("loss_unselected", sums["all_loss"] - sums["sel_loss"], n_valid - n_sel)
    if "ref" in sums:
        m.ratio("ref_loss", sums["ref"], n_valid)
    if name == "soft":
        m.ratio("effective_frac", sums["w"], n_valid)
        if sums["w"] > 0:  # entropy of p = w / W: log W - sum(w log w) / W
            m.mean("weight_entropy", math.log(sums["w"]) - sums["wlogw"] / sums["w"])
    threshold = w.threshold
    if scope != "global" and group is not None:
        # Local scopes have a threshold per row / rank: report the lowest selected score of the group.
        t = torch.tensor(threshold if n_sel > 0 and threshold == threshold else math.inf, dtype=torch.float64,
                         device=w.weights.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        threshold = t.item()
    if n_sel > 0 and threshold is not None:
        m.mean("threshold", threshold)
    for q, v in zip(EXCESS_QUANTILES, w.quantiles):
        if v == v:
            m.mean(f"excess_p{round(q * 100)}", v)
    for i in range(num_sources if srcs else 0):
        m.ratio(f"selected_frac/{i}", srcs[num_sources + i], srcs[i])
    return m
