"""A "history" reference: an exponential moving average of the model being trained (reference.ema_decay).

The reference starts as a copy of the trained model's initial weights and, after every optimizer step, becomes
`ema = d * ema + (1 - d) * weights` (d = 1 keeps the initial model). The average is kept in float32 on every rank
(identical everywhere: each rank reads the same, fully replicated weights after the step), runs through the same
loss head as the trained model, and is saved in every checkpoint under the callback name "ema_reference", so a
resumed run continues the same average.

Supported where every rank holds the whole trained model after a step: ZeRO stage 0, 1 or 2 with
parallel.tensor 1. ZeRO-3 partitions the weights and tensor parallelism shards them; both are refused at start.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from megaslm.errors import UserError
from megaslm.model.build import TokenLossModel
from megaslm.model.describe import describe_module
from megaslm.reference.base import ModelReference
from megaslm.callbacks import Callback


def check_ema_layout(zero: int, tp_size: int, ds_path: str) -> None:
    if zero == 3:
        raise UserError(f"reference.ema_decay needs the whole trained model on every rank, but deepspeed.config "
                        f"{ds_path} is ZeRO-3 (weights partitioned): use a ZeRO-1 or ZeRO-2 config, or a separate "
                        "reference (reference.path)")
    if tp_size > 1:
        raise UserError(f"reference.ema_decay is not supported with parallel.tensor={tp_size} (weights sharded): "
                        "use parallel.tensor=1 or a separate reference (reference.path)")


class EMAReference(ModelReference, Callback):
    name = "ema_reference"
    placement = "ema"

    def __init__(self, trained_lm: torch.nn.Module, decay: float):
        if not 0 < decay <= 1:
            raise ValueError(f"ema decay must be in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self.trained = trained_lm
        device = next(trained_lm.parameters()).device
        lm = AutoModelForCausalLM.from_config(trained_lm.config, dtype=torch.float32).to(device)
        lm.load_state_dict({k: v.detach().float() for k, v in trained_lm.state_dict().items()})
        lm.requires_grad_(False)
        lm.eval()
        self.scorer = TokenLossModel(lm)
        self.description = describe_module(lm)
        self.updates = 0
        self._pairs = self._match(lm, trained_lm)

    @staticmethod
    def _match(ema: torch.nn.Module, trained: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mine = dict(ema.named_parameters())
        return [(mine[n], p) for n, p in trained.named_parameters()]

    @torch.no_grad()
    def post_step(self, trainer, rec: dict) -> None:
        self.updates += 1
        if self.decay == 1.0:
            return
        for e, p in self._pairs:
            e.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "weights": {k: v.detach().cpu().clone() for k, v in self.scorer.lm.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["decay"] != self.decay:
            raise UserError(f"reference.ema_decay is {self.decay} but the checkpoint's average was made with "
                            f"{state['decay']}: resume with the same value")
        self.scorer.lm.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
