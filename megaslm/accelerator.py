"""DeepSpeed's accelerator, chosen before DeepSpeed is imported. It imports torch (seconds on a loaded node), so
each command calls it after the refusals that need no model: `train` after its lease, `eval` after its task names,
the others before they run (megaslm/cli.py)."""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def set_accelerator() -> None:
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda():
        os.environ["DS_ACCELERATOR"] = "cpu"  # otherwise DeepSpeed warns on every import that it found no GPU
