"""Loss head and Rho-1 objective: chunked / vocab-parallel per-token CE, token selection, the training loss.

The names below are imported on first use: the config checks import this package's torch-free parts (choices,
weights, rules) without loading torch, which the implementations need.
"""

from __future__ import annotations

import importlib
import sys
import types

_LAZY = {"Metrics": "metrics", "Objective": "objective", "StepNorm": "objective",
         "compute_objective": "objective", "plan_step": "objective", "slm_ratio": "objective",
         "per_token_ce": "per_token_ce", "NaNScoreError": "selection", "Selection": "selection",
         "global_kth_largest": "selection", "global_quantiles": "selection", "num_to_keep": "selection",
         "select_on_device": "selection", "select_tokens": "selection", "select_tokens_with_threshold": "selection"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule per_token_ce binds it here under its name; `megaslm.loss.per_token_ce` stays the
        # function, as it was when this package imported it eagerly.
        if name == "per_token_ce" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
