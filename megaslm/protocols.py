"""The interfaces the training loop is written against, so that it knows no concrete loader or reference."""

from __future__ import annotations

from typing import Protocol

import torch


class Loader(Protocol):
    """A resumable source of training batches: {"input_ids", "labels": [B, T] long, "index", optional
    "position_ids", "source"} per call, exactly resumable from its state."""

    epoch: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ReferenceLosses(Protocol):
    """Per-token reference losses for the loader's batches (megaslm.reference: cache, online engine, ensemble,
    EMA; the trainer does not know which)."""

    placement: str

    def forward_flops_per_token(self, seq_len: int) -> float: ...

    def losses_for(self, batch: dict) -> torch.Tensor: ...
