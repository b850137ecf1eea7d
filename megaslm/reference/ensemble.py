"""Several references as one: the per-token losses of each, combined by mean or min (reference.combine)."""

from __future__ import annotations

import torch

COMBINE = {"mean": lambda x: x.mean(dim=0), "min": lambda x: x.amin(dim=0)}


class EnsembleReference:
    """`losses_for(batch)` = combine over members of member.losses_for(batch); all members score the same tokens
    (one tokenizer, checked per member when it is built)."""

    def __init__(self, members: list, combine: str):
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(COMBINE)}, got {combine!r}")
        self.members = members
        self.combine = combine
        self.placement = f"ensemble[{','.join(m.placement for m in members)}]"

    def forward_flops_per_token(self, seq_len: int) -> float:
        return sum(m.forward_flops_per_token(seq_len) for m in self.members)

    @torch.no_grad()
    def losses_for(self, batch: dict) -> torch.Tensor:
        return COMBINE[self.combine](torch.stack([m.losses_for(batch) for m in self.members]))

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Of token ids alone (online members only)."""
        return COMBINE[self.combine](torch.stack([m.losses(input_ids, labels, position_ids) for m in self.members]))
