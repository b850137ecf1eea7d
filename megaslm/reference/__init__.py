"""Reference-model token losses for Selective Language Modeling: one interface, several sources.

The trainer calls `make_reference(cfg, ...)` once and then only `losses_for(batch) -> float32 [B, T]` (batch: the
loader's dict with input_ids and labels on the device, and index). What it gets, by config:
- `CachedReference` (cache.py): losses that `megaslm score` (score.py) computed once into `reference.cache`;
- `OnlineReference` (online.py): a frozen Hugging Face model of `reference.path` run beside the trained one as a
  DeepSpeed inference engine (placement replicated | zero3 | zero3_offload | auto);
- `EnsembleReference` (ensemble.py): `reference.path` a list, per-token losses combined by `reference.combine`;
- `EMAReference` (ema.py): `reference.ema_decay`, an average of the trained model itself; it is also a trainer
  callback (updated after every optimizer step, saved in checkpoints).
Each has `placement` (for run_info) and `forward_flops_per_token(seq_len)` (what it runs per training token, for
the trainer's MFU: a forward, 2N + attention, as `megaslm plan` counts it; 0 for a cache).
Module dependencies point one way: cache <- score, online <- score, and this package imports nothing of
megaslm.train but the callback base class.
"""

from __future__ import annotations

from typing import Protocol

import torch

from megaslm.config import reference_paths
from megaslm.errors import UserError
from megaslm.reference.cache import CachedReference, is_complete
from megaslm.reference.ensemble import EnsembleReference
from megaslm.reference.online import (AUTO_FRACTION, OnlineReference, check_reference_tokenizer, choose_placement,
                                      reference_bytes)

__all__ = ["ReferenceLosses", "make_reference", "needs_reference", "CachedReference", "OnlineReference",
           "EnsembleReference", "check_reference_tokenizer", "choose_placement", "reference_bytes", "AUTO_FRACTION"]


class ReferenceLosses(Protocol):
    placement: str

    def forward_flops_per_token(self, seq_len: int) -> float: ...

    def losses_for(self, batch: dict) -> torch.Tensor: ...


def needs_reference(cfg) -> bool:
    """Scores that read reference losses (excess, retrospective) need one; CLM and `slm.score: loss` or
    `entropy` do not (none is loaded)."""
    from megaslm.loss.rules import SCORES

    return cfg.objective == "slm" and SCORES[cfg.slm.score].needs_reference


def make_reference(cfg, *, shards, dtype: torch.dtype, micro_batch_size: int, dp_size: int, mpu=None,
                   tp_group=None, tp_size: int = 1, vocab_size: int | None = None, trained_lm=None,
                   zero_stage: int = 0):
    """The reference of an SLM run, by precedence: the EMA of `trained_lm` (reference.ema_decay); a
    `CachedReference` when reference.cache holds a complete cache (scored with reference.path's model when both
    are set); else `OnlineReference`s of reference.path (an `EnsembleReference` when it lists several)."""
    r = cfg.reference
    if r.ema_decay is not None:
        from megaslm.reference.ema import EMAReference, check_ema_layout

        check_ema_layout(zero_stage, tp_size, cfg.deepspeed.config)
        return EMAReference(trained_lm, r.ema_decay)
    paths = reference_paths(cfg)
    if r.cache:
        if is_complete(r.cache) or not paths:
            return CachedReference(r.cache, shards, cfg.train.seq_len, model_path=paths[0] if paths else None)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megaslm: reference.cache {r.cache} holds no complete cache; running the reference "
                  f"{paths[0]} online (score it first with `megaslm score`)", flush=True)
    if not paths:
        raise UserError("reference.path is required when objective is slm and reference.cache is not set")
    members = []
    for p in paths:
        check_reference_tokenizer(p, vocab_size or shards.vocab_size, shards.fingerprint, shards.path)
        members.append(OnlineReference(p, r.placement, dtype=dtype, micro_batch_size=micro_batch_size,
                                       dp_size=dp_size, mpu=mpu, tp_group=tp_group, tp_size=tp_size))
    return members[0] if len(members) == 1 else EnsembleReference(members, r.combine)
