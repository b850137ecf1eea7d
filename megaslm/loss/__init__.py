"""Loss head and Rho-1 objective: chunked / vocab-parallel per-token CE, token selection, the training loss."""

from .metrics import Metrics
from .objective import Objective, StepNorm, compute_objective, plan_step, slm_ratio
from .per_token_ce import per_token_ce
from .selection import (
    NaNScoreError,
    Selection,
    global_kth_largest,
    global_quantiles,
    num_to_keep,
    select_on_device,
    select_tokens,
    select_tokens_with_threshold,
)

__all__ = [
    "Metrics",
    "NaNScoreError",
    "Objective",
    "StepNorm",
    "compute_objective",
    "global_kth_largest",
    "global_quantiles",
    "num_to_keep",
    "per_token_ce",
    "plan_step",
    "Selection",
    "select_on_device",
    "select_tokens",
    "select_tokens_with_threshold",
    "slm_ratio",
]
