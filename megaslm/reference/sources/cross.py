"""Source `cross`: one reference.path whose tokenizer is not the shards' (megaslm/reference/cross.py, xtok.py):
the reference scores the same text in its own tokens, its losses carried onto the trained tokens by bytes.
It claims the run when the model directory holds a tokenizer whose sha256 differs from the one data.train's
shards record (files hashed, nothing loaded); `megaslm score` scores whole documents for it (score_docs.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megaslm.config import first_train_path, reference_paths
from megaslm.reference.sources.base import Member, ReferenceSource, register_source


def tokenizer_sha256(path: str) -> str | None:
    """The fingerprint megaslm.data.tokenizer gives the tokenizer of a model directory (None: it has none)."""
    for name in ("tokenizer.model", "tokenizer.json"):  # load_tokenizer's order
        f = Path(path) / name
        if f.is_file():
            return hashlib.sha256(f.read_bytes()).hexdigest()
    return None


def shards_sha256(cfg) -> str | None:
    try:
        return json.loads((Path(first_train_path(cfg.data)) / "meta.json").read_text()).get("tokenizer_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


@register_source
class CrossTokenizerSource(ReferenceSource):
    name = "cross"
    order = 45

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        paths = reference_paths(cfg)
        if len(paths) != 1:
            return None
        mine, theirs = tokenizer_sha256(paths[0]), shards_sha256(cfg)
        return [Member("cross", paths[0])] if mine and theirs and mine != theirs else None

    @classmethod
    def build(cls, cfg, members, ctx):
        from megaslm.reference.sources.online import build_one, note_unscored_cache

        note_unscored_cache(cfg, members[0].path)
        return build_one(cfg, members[0].path, ctx)  # tokenizer_pair there checks data.tokenizer and wraps it
