"""Source `imported`: a reference.cache written by `megaslm score --import` from another engine's log-probabilities
(megaslm/reference/imported.py). Read as any cache; there is no model to check it against."""

from __future__ import annotations

import json
from pathlib import Path

from megaslm.reference.sources.base import Member, ReferenceSource, register_source


@register_source
class ImportedSource(ReferenceSource):
    name = "imported"
    order = 20  # before `cache`: a reference.path beside it names no model the losses came from

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        meta = Path(cfg.reference.cache or "") / "meta.json"
        if not cfg.reference.cache or not meta.is_file():
            return None
        try:
            imported = json.loads(meta.read_text()).get("reference", {}).get("placement") == "imported"
        except (OSError, ValueError, AttributeError):
            return None  # the cache source reads it and names what is wrong
        return [Member("imported")] if imported else None

    @classmethod
    def build(cls, cfg, members, ctx):
        from megaslm.reference.cache import CachedReference

        return CachedReference(cfg.reference.cache, ctx.shards, cfg.train.seq_len)

    @classmethod
    def plan(cls, cfg, member, model, d, hw):
        return model, "cache"
