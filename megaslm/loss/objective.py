"""The training objective the trainer calls once per micro-step: plain CLM, or Rho-1 SLM on the excess loss."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .selection import SCOPES, check_ratio, select_with_quantiles

OBJECTIVES = ("clm", "slm")
EXCESS_QUANTILES = (0.1, 0.5, 0.9)


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
    stop_requested: bool | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, metrics) for one micro-batch of one data-parallel rank.

    token_loss: [B, T] float32 per-token CE with grad (0 where not valid); ref_loss: [B, T] reference model's
    per-token CE (no grad; None for "clm"); valid: [B, T] bool tokens that carry a label.
    objective "clm": mean CE over every valid token of the global micro-batch (the union over dp_group);
    "slm": mean CE over the tokens selected by excess = token_loss - ref_loss (top `ratio`, see selection.py).
    dp_group: the data-parallel group (default: the world if torch.distributed is initialized); every rank of
    it must call this together. source: optional [B, T] long source index of each token (indices outside
    [0, num_sources) are not counted per source).

    Metrics are identical on every rank and describe the global micro-batch: loss, loss_all, n_valid, and for
    "slm" also loss_selected, loss_unselected (omitted when every valid token is selected), ref_loss,
    selected_frac, threshold (excess of the k-th selected token; for the local scopes the lowest selected
    excess of the group), excess_p10/p50/p90 (exact, numpy's "lower" quantiles), n_selected. Means over no
    tokens are omitted rather than NaN. With `source`, tokens/<i> for every source and (slm) selected_frac/<i>
    for the sources with tokens. stop_requested: this rank's stop flag, summed over dp_group in the same
    all-reduce as the metrics (the trainer's per-step stop check costs no collective of its own); the count of
    ranks that asked comes back as stats["stop_requested"]. Every rank of dp_group passes one or none.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if token_loss.dim() != 2 or token_loss.shape != valid.shape:
        raise ValueError(f"token_loss {tuple(token_loss.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    if objective == "slm":
        check_ratio(ratio)
        if scope not in SCOPES:
            raise ValueError(f"selection scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if ref_loss is None or ref_loss.shape != token_loss.shape:
            raise ValueError("objective 'slm' needs ref_loss shaped like token_loss")
    if source is not None and source.shape != token_loss.shape:
        raise ValueError(f"source {tuple(source.shape)} must match token_loss {tuple(token_loss.shape)}")
    if dp_group is None and dist.is_available() and dist.is_initialized():
        dp_group = dist.group.WORLD
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    valid = valid.bool()
    per_source = source is not None and num_sources > 0

    threshold, quantiles = None, []
    if objective == "slm":
        excess = token_loss.detach().float() - ref_loss.detach().float()
        selected, threshold, quantiles = select_with_quantiles(
            excess, valid, ratio, scope, EXCESS_QUANTILES, dp_group
        )
    else:
        selected = valid

    # where(), not a product: a NaN/inf on an unselected position must not reach the sum or its gradient.
    loss_sum = torch.where(selected, token_loss, 0.0).sum()

    # Every sum the metrics and the normalization need, in one all-reduce (float64: counts stay exact).
    loss_d = token_loss.detach().double()
    parts = [
        torch.where(selected, loss_d, 0.0).sum(),
        selected.sum().double(),
        torch.where(valid, loss_d, 0.0).sum(),
        valid.sum().double(),
    ]
    if objective == "slm":
        parts.append(torch.where(valid, ref_loss.detach().double(), 0.0).sum())
    sums = torch.stack(parts)
    if per_source:
        src = torch.where(valid & (source >= 0) & (source < num_sources), source, num_sources)
        src_valid = torch.bincount(src.reshape(-1), minlength=num_sources + 1)[:num_sources]
        src_sel = torch.bincount(src[selected], minlength=num_sources + 1)[:num_sources]
        sums = torch.cat([sums, src_valid.double(), src_sel.double()])
    if stop_requested is not None:
        sums = torch.cat([sums, sums.new_tensor([float(stop_requested)])])
    if dp_group is not None:
        dist.all_reduce(sums, group=dp_group)
    totals = sums.tolist()
    sum_sel, n_sel, sum_all, n_valid = totals[0], int(totals[1]), totals[2], int(totals[3])

    # DeepSpeed averages gradients over the data-parallel group (divides by dp_size). Scaling this rank's sum by
    # dp_size / n_selected_global makes that average the gradient of the mean CE over the selected tokens of the
    # concatenated global micro-batch: exactly what one rank would get on the whole batch.
    loss = loss_sum * (dp_size / n_sel) if n_sel > 0 else loss_sum * 0.0

    stats: dict[str, float] = {"n_valid": float(n_valid)}
    if n_sel > 0:
        stats["loss"] = sum_sel / n_sel
    if n_valid > 0:
        stats["loss_all"] = sum_all / n_valid
    if objective == "slm":
        stats["n_selected"] = float(n_sel)
        if n_valid > 0:
            stats["loss_selected"] = stats["loss"]
            stats["ref_loss"] = totals[4] / n_valid
            stats["selected_frac"] = n_sel / n_valid
            if n_valid > n_sel:
                stats["loss_unselected"] = (sum_all - sum_sel) / (n_valid - n_sel)
            if scope != "global" and dp_group is not None:
                # Local scopes have a threshold per row / rank: report the lowest selected excess of the group.
                t = torch.tensor(threshold if bool(selected.any()) else float("inf"), dtype=torch.float64,
                                 device=sums.device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN, group=dp_group)
                threshold = t.item()
            if n_sel > 0:
                stats["threshold"] = threshold
            for q, v in zip(EXCESS_QUANTILES, quantiles):
                stats[f"excess_p{round(q * 100)}"] = v
    if per_source:
        base = len(parts)
        for i in range(num_sources):
            n_i, sel_i = totals[base + i], totals[base + num_sources + i]
            stats[f"tokens/{i}"] = n_i
            if objective == "slm" and n_i > 0:
                stats[f"selected_frac/{i}"] = sel_i / n_i
    if stop_requested is not None:
        stats["stop_requested"] = totals[-1]
    return loss, stats
