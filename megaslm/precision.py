"""The training precision of a config, shared by training, scoring and the reference (no import cycle)."""

from __future__ import annotations

import torch


def training_dtype(cfg) -> torch.dtype:
    """model.dtype resolved: fp32, bf16, or auto (bf16 on GPUs that support it, else fp32)."""
    if cfg.model.dtype == "fp32":
        return torch.float32
    if cfg.model.dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
