"""The reference-source component: its base class, the registry, and the questions asked of it (see __init__)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Member:
    """One reference of a run: the source `kind` that holds it and the model directory `path` (when any)."""
    kind: str
    path: str | None = None


@dataclass
class BuildContext:
    """What building a reference needs from the trainer (or from `megaslm score`)."""
    shards: object
    dtype: object
    micro_batch_size: int
    dp_size: int
    mpu: object = None
    tp_group: object = None
    tp_size: int = 1
    vocab_size: int | None = None
    trained_lm: object = None
    zero_stage: int = 0


class ReferenceSource:
    name: ClassVar[str]
    order: ClassVar[int] = 50  # resolve asks the sources in this order; the first that claims the run wins

    @classmethod
    def validate(cls, cfg, bad) -> None:
        """Config checks of the reference.* fields this source owns (bad(key, msg) -> UserError)."""

    @classmethod
    def configured(cls, cfg) -> bool:
        """The config names this source (whether or not it ends up claiming the run)."""
        return False

    @classmethod
    def members(cls, cfg, *, assume_cache_scored: bool = False) -> list[Member] | None:
        """The references of the run when this source claims it, else None."""
        return None

    @classmethod
    def build(cls, cfg, members: list[Member], ctx: BuildContext):
        raise NotImplementedError

    @classmethod
    def plan(cls, cfg, member: Member, model, d: int, hw) -> tuple[object, str]:
        """(ModelDescription, placement) of one member, for `megaslm plan`."""
        from megaslm.plan import describe_reference

        return describe_reference(cfg, member, model, d, hw)

    @classmethod
    def preflight(cls, cfg, src: str) -> None:
        """Before the run directory exists: the paths this source reads are of the right kind."""

    @classmethod
    def check(cls, cfg, model_vocab: int | None) -> None:
        """Before any engine: what cannot run (positions, vocabularies)."""


SOURCES: dict[str, type[ReferenceSource]] = {}


def register_source(cls: type[ReferenceSource]) -> type[ReferenceSource]:
    SOURCES[cls.name] = cls
    return cls


def ordered() -> list[type[ReferenceSource]]:
    return sorted(SOURCES.values(), key=lambda s: (s.order, s.name))


def has_reference(cfg) -> bool:
    """The loss layer's one question: does the config name a reference of any kind?"""
    return any(s.configured(cfg) for s in SOURCES.values())


def claim(cfg, *, assume_cache_scored: bool = False) -> tuple[type[ReferenceSource] | None, list[Member]]:
    """The source that claims the run (the first by order) and its members; (None, []) for objectives that read
    no reference. `assume_cache_scored`: plan a reference.cache as filled, as `megaslm score` will fill it."""
    from megaslm.loss.rules import SCORES

    if not (cfg.objective == "slm" and SCORES[cfg.slm.score].needs_reference):
        return None, []
    for source in ordered():
        found = source.members(cfg, assume_cache_scored=assume_cache_scored)
        if found is not None:
            return source, found
    return None, []


def resolve(cfg, *, assume_cache_scored: bool = False) -> list[Member]:
    """The references of a run, by `claim`."""
    return claim(cfg, assume_cache_scored=assume_cache_scored)[1]
