"""Reference-model token losses for Selective Language Modeling: one interface, several sources.

Which references a run holds is decided once, by `resolve(cfg)` (training and `megaslm plan` alike), from the
registered sources of megaslm/reference/sources/ (one module each: ema, imported, cache, ensemble, cross,
online; each owns its config fields, build, plan and preflight shares). The trainer gets `make_reference(cfg,
...)` once (megaslm/launch.py builds it) and then calls only `losses_for(batch) -> float32 [B, T]` (batch: the
loader's dict with input_ids and labels on the device, and index). The implementations:
- `CachedReference` (cache.py): losses that `megaslm score` (score.py) computed once into `reference.cache`, or
  that `megaslm score --import` (imported.py) aligned from another engine's log-probabilities;
- `OnlineReference` (online.py): a frozen Hugging Face model of `reference.path` run beside the trained one as a
  DeepSpeed inference engine (placement replicated | zero3 | zero3_offload | auto);
- `CrossTokenizerReference` (cross.py): an online model of another tokenizer, its losses carried by bytes;
- `EnsembleReference` (ensemble.py): `reference.path` a list, per-token losses combined by `reference.combine`;
- `EMAReference` (ema.py): `reference.ema_decay`, an average of the trained model itself; it is also a trainer
  callback (updated after every optimizer step, saved in checkpoints).
Each has `placement` (for run_info) and `forward_flops_per_token(seq_len)` (what it runs per training token, for
the trainer's MFU: a forward, 2N + attention, as `megaslm plan` counts it; 0 for a cache).
This package's names are imported lazily, so that the config checks (which ask the sources) load no model code.
"""

from __future__ import annotations

import importlib

from megaslm.errors import UserError
from megaslm.reference.sources import BuildContext, Member, claim, has_reference, resolve

Source = Member  # the name plan.py and older code use for one reference of a run

_LAZY = {"CachedReference": "cache", "is_complete": "cache", "EnsembleReference": "ensemble",
         "OnlineReference": "online", "check_reference_tokenizer": "online", "choose_placement": "online",
         "reference_bytes": "online", "AUTO_FRACTION": "online", "ReferenceLosses": None,
         "CrossTokenizerReference": "cross"}

__all__ = ["Source", "Member", "resolve", "make_reference", "needs_reference", "has_reference", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LAZY[name] is None:
        from megaslm.protocols import ReferenceLosses

        return ReferenceLosses
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def needs_reference(cfg) -> bool:
    """Scores that read reference losses (excess, retrospective) need one; CLM and `slm.score: loss` or
    `entropy` do not (none is loaded)."""
    from megaslm.loss.rules import SCORES

    return cfg.objective == "slm" and SCORES[cfg.slm.score].needs_reference


def make_reference(cfg, *, shards, dtype, micro_batch_size: int, dp_size: int, mpu=None, tp_group=None,
                   tp_size: int = 1, vocab_size: int | None = None, trained_lm=None, zero_stage: int = 0):
    """The reference of an SLM run: built by the source that `resolve` finds."""
    source, members = claim(cfg)
    if not members:
        raise UserError("reference.path is required when objective is slm and reference.cache is not set")
    ctx = BuildContext(shards=shards, dtype=dtype, micro_batch_size=micro_batch_size, dp_size=dp_size, mpu=mpu,
                       tp_group=tp_group, tp_size=tp_size, vocab_size=vocab_size, trained_lm=trained_lm,
                       zero_stage=zero_stage)
    return source.build(cfg, members, ctx)
