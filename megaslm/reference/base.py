"""What every reference that runs a model shares (online engines and the EMA): its losses and their cost."""

from __future__ import annotations

import torch

from megaslm.model.describe import ModelDescription


class ModelReference:
    """Subclasses set `scorer` (a TokenLossModel, or a DeepSpeed engine wrapping one) and `description` (the
    model's ModelDescription, for the trainer's FLOPs count)."""

    scorer: torch.nn.Module
    description: ModelDescription

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.scorer(input_ids, labels, position_ids).float()

    def losses_for(self, batch: dict) -> torch.Tensor:
        """`losses` of the loader's batch dict (input_ids, labels and position_ids already on the device)."""
        return self.losses(batch["input_ids"], batch["labels"], batch.get("position_ids"))

    def forward_flops_per_token(self, seq_len: int) -> float:
        return self.description.forward_flops_per_token(seq_len)
