"""Learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(warmup: int, total: int, min_ratio: float):
    """A callable DeepSpeed turns into the engine's scheduler (it steps it once per optimizer step)."""
    return lambda optimizer: LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, min_ratio))
