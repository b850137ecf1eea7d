"""Source `ema`: reference.ema_decay, an average of the trained model itself (megaslm/reference/ema.py)."""

from __future__ import annotations

from megaslm.config import reference_paths
from megaslm.reference.sources.base import Member, ReferenceSource, register_source


@register_source
class EMASource(ReferenceSource):
    name = "ema"
    order = 10

    @classmethod
    def validate(cls, cfg, bad) -> None:
        r = cfg.reference
        if r.ema_decay is None:
            return
        if not 0 < r.ema_decay <= 1:
            raise bad("reference.ema_decay", f"must be in (0, 1], got {r.ema_decay}")
        if reference_paths(cfg) or r.cache:
            raise bad("reference.ema_decay", "makes the reference an average of the trained model: drop "
                      "reference.path and reference.cache, or drop reference.ema_decay")

    @classmethod
    def configured(cls, cfg) -> bool:
        return cfg.reference.ema_decay is not None

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        return [Member("ema")] if cls.configured(cfg) else None

    @classmethod
    def build(cls, cfg, members, ctx):
        from megaslm.reference.ema import EMAReference, check_ema_layout

        check_ema_layout(ctx.zero_stage, ctx.tp_size, cfg.deepspeed.config)
        return EMAReference(ctx.trained_lm, cfg.reference.ema_decay)

    @classmethod
    def plan(cls, cfg, member, model, d, hw):
        return model, "ema"  # an fp32 copy of the trained model on every rank
