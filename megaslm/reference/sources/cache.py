"""Source `cache`: reference.cache, losses `megaslm score` wrote to disk (megaslm/reference/cache.py)."""

from __future__ import annotations

from megaslm.config import reference_paths
from megaslm.reference.sources.base import Member, ReferenceSource, register_source


@register_source
class CacheSource(ReferenceSource):
    name = "cache"
    order = 30

    @classmethod
    def validate(cls, cfg, bad) -> None:
        r = cfg.reference
        if not r.cache:
            return
        if cfg.data.document_mask or isinstance(cfg.data.train, list):
            raise bad("reference.cache", "cannot be used with a mixture data.train or data.document_mask (the cache "
                                         "is scored on one shard directory without document masking); use "
                                         "reference.path")
        if len(reference_paths(cfg)) > 1:
            raise bad("reference.cache", f"holds the losses of one model but reference.path lists "
                      f"{len(reference_paths(cfg))}: drop reference.cache to run the ensemble online")

    @classmethod
    def configured(cls, cfg) -> bool:
        return bool(cfg.reference.cache)

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        """The cache when it is complete, or when no model is named to run instead (then it must be)."""
        from megaslm.reference.cache import is_complete

        r, paths = cfg.reference, reference_paths(cfg)
        if r.cache and (assume_cache_scored or not paths or is_complete(r.cache)):
            return [Member("cache", paths[0] if paths else None)]
        return None

    @classmethod
    def build(cls, cfg, members, ctx):
        from megaslm.reference.cache import CachedReference

        return CachedReference(cfg.reference.cache, ctx.shards, cfg.train.seq_len, model_path=members[0].path)

    @classmethod
    def plan(cls, cfg, member, model, d, hw):
        from megaslm.plan import describe_reference

        return describe_reference(cfg, member, model, d, hw)[0], "cache"

    @classmethod
    def preflight(cls, cfg, src: str) -> None:
        if cfg.reference.cache:
            from megaslm.preflight import expect_dir
            from megaslm.reference.cache import META_FILE

            expect_dir("reference.cache", cfg.reference.cache, META_FILE, "a reference-loss cache written by "
                       "`megaslm score`", src)
