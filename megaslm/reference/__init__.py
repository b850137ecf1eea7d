"""Reference-model token losses for Selective Language Modeling: one interface, several sources.

Which references a run holds is decided once, by `resolve(cfg)` (training and `megaslm plan` alike). The trainer
gets `make_reference(cfg, ...)` once (megaslm/launch.py builds it) and then calls only `losses_for(batch) ->
float32 [B, T]` (batch: the loader's dict with input_ids and labels on the device, and index). By config:
- `CachedReference` (cache.py): losses that `megaslm score` (score.py) computed once into `reference.cache`;
- `OnlineReference` (online.py): a frozen Hugging Face model of `reference.path` run beside the trained one as a
  DeepSpeed inference engine (placement replicated | zero3 | zero3_offload | auto);
- `EnsembleReference` (ensemble.py): `reference.path` a list, per-token losses combined by `reference.combine`;
- `EMAReference` (ema.py): `reference.ema_decay`, an average of the trained model itself; it is also a trainer
  callback (updated after every optimizer step, saved in checkpoints).
Each has `placement` (for run_info) and `forward_flops_per_token(seq_len)` (what it runs per training token, for
the trainer's MFU: a forward, 2N + attention, as `megaslm plan` counts it; 0 for a cache).
Module dependencies point one way: cache <- score, online <- score; the EMA's callback base class is
megaslm/callbacks.py, below every package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaslm.config import reference_paths
from megaslm.errors import UserError
from megaslm.protocols import ReferenceLosses
from megaslm.reference.cache import CachedReference, is_complete
from megaslm.reference.ensemble import EnsembleReference
from megaslm.reference.online import (AUTO_FRACTION, OnlineReference, check_reference_tokenizer, choose_placement,
                                      reference_bytes)

__all__ = ["ReferenceLosses", "Source", "resolve", "make_reference", "needs_reference", "CachedReference", "OnlineReference",
           "EnsembleReference", "check_reference_tokenizer", "choose_placement", "reference_bytes", "AUTO_FRACTION"]


def needs_reference(cfg) -> bool:
    """Scores that read reference losses (excess, retrospective) need one; CLM and `slm.score: loss` or
    `entropy` do not (none is loaded)."""
    from megaslm.loss.rules import SCORES

    return cfg.objective == "slm" and SCORES[cfg.slm.score].needs_reference


@dataclass(frozen=True)
class Source:
    """One reference model of a run: kind "ema" (the average of the trained model), "cache" (losses on disk,
    scored with the model `path` when set) or "online" (the model directory `path`, run beside training)."""
    kind: str
    path: str | None = None


def resolve(cfg, *, assume_cache_scored: bool = False) -> list[Source]:
    """The reference models of a run, by precedence; the one copy of it, used by training (`make_reference`) and
    by `megaslm plan` (`assume_cache_scored`: a reference.cache counts as filled, as `megaslm score` will fill it).
    None for objectives that read no reference; the EMA (reference.ema_decay); the cache when reference.cache
    holds a complete one (or no reference.path is set to run instead); else one online model per reference.path."""
    if not needs_reference(cfg):
        return []
    r = cfg.reference
    if r.ema_decay is not None:
        return [Source("ema")]
    paths = reference_paths(cfg)
    if r.cache and (assume_cache_scored or not paths or is_complete(r.cache)):
        return [Source("cache", paths[0] if paths else None)]
    return [Source("online", p) for p in paths]


def make_reference(cfg, *, shards, dtype: torch.dtype, micro_batch_size: int, dp_size: int, mpu=None,
                   tp_group=None, tp_size: int = 1, vocab_size: int | None = None, trained_lm=None,
                   zero_stage: int = 0):
    """The reference of an SLM run (`resolve`): an EMA of `trained_lm`, a `CachedReference`, or `OnlineReference`s
    of reference.path (an `EnsembleReference` when it lists several)."""
    r = cfg.reference
    sources = resolve(cfg)
    if sources and sources[0].kind == "ema":
        from megaslm.reference.ema import EMAReference, check_ema_layout

        check_ema_layout(zero_stage, tp_size, cfg.deepspeed.config)
        return EMAReference(trained_lm, r.ema_decay)
    if sources and sources[0].kind == "cache":
        return CachedReference(r.cache, shards, cfg.train.seq_len, model_path=sources[0].path)
    if r.cache and sources:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megaslm: reference.cache {r.cache} holds no complete cache; running the reference "
                  f"{sources[0].path} online (score it first with `megaslm score`)", flush=True)
    if not sources:
        raise UserError("reference.path is required when objective is slm and reference.cache is not set")
    from megaslm.reference.cross import CrossTokenizerReference, tokenizer_pair

    members = []
    for src in sources:
        pair = tokenizer_pair(src.path, shards, cfg.data.tokenizer, vocab_size=vocab_size)
        m = OnlineReference(src.path, r.placement, dtype=dtype, micro_batch_size=micro_batch_size, dp_size=dp_size,
                            mpu=mpu, tp_group=tp_group, tp_size=tp_size)
        members.append(m if pair is None else CrossTokenizerReference(m, pair))
    return members[0] if len(members) == 1 else EnsembleReference(members, r.combine)
