"""Source `ensemble`: reference.path a list, per-token losses combined by reference.combine
(megaslm/reference/ensemble.py). Each member is built as the `online` source builds one model (another tokenizer
included)."""

from __future__ import annotations

from megaslm.config import reference_paths
from megaslm.reference.sources.base import Member, ReferenceSource, register_source

COMBINES = ("mean", "min")


@register_source
class EnsembleSource(ReferenceSource):
    name = "ensemble"
    order = 40

    @classmethod
    def validate(cls, cfg, bad) -> None:
        if cfg.reference.combine not in COMBINES:
            raise bad("reference.combine", f"must be {' or '.join(COMBINES)}, got {cfg.reference.combine!r}")

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        paths = reference_paths(cfg)
        return [Member("online", p) for p in paths] if len(paths) > 1 else None

    @classmethod
    def build(cls, cfg, members, ctx):
        from megaslm.reference.ensemble import EnsembleReference
        from megaslm.reference.sources.online import build_one, note_unscored_cache

        note_unscored_cache(cfg, members[0].path)
        return EnsembleReference([build_one(cfg, m.path, ctx) for m in members], cfg.reference.combine)
