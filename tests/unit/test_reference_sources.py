"""Reference sources as registered components (megaslm/reference/sources/)."""

from __future__ import annotations

import json

import pytest
import yaml

from megaslm.config import load_config
from megaslm.reference.sources import SOURCES, Member, ReferenceSource, claim, has_reference, ordered, resolve


def _cfg(tmp_path, tiny_data, **reference):
    data = {"run": {"dir": str(tmp_path / "r")}, "data": {"train": tiny_data["train"]}, "objective": "slm",
            "reference": reference}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    return load_config(tmp_path / "c.yaml")


def _model_dir(tmp_path, name, tokenizer=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    if tokenizer:  # a SentencePiece tokenizer directory: its tokenizer.model
        import shutil

        shutil.copyfile(f"{tokenizer}/tokenizer.model", d / "tokenizer.model")
    return str(d)


def test_every_source_is_registered_in_precedence_order():
    assert [s.name for s in ordered()] == ["ema", "imported", "cache", "ensemble", "cross", "online"]


def test_resolve_picks_the_first_source_that_claims_the_run(tmp_path, tiny_data):
    same = _model_dir(tmp_path, "same", str(tiny_data["tok"]))
    other = _model_dir(tmp_path, "other", str(tiny_data["root"] / "tok_other"))
    assert resolve(_cfg(tmp_path, tiny_data, path=same)) == [Member("online", same)]
    assert resolve(_cfg(tmp_path, tiny_data, path=other)) == [Member("cross", other)]
    assert resolve(_cfg(tmp_path, tiny_data, path=[same, other])) == [Member("online", same), Member("online", other)]
    assert resolve(_cfg(tmp_path, tiny_data, ema_decay=0.9)) == [Member("ema")]
    cache = tmp_path / "cache"
    assert resolve(_cfg(tmp_path, tiny_data, path=other, cache=str(cache))) == [Member("cross", other)]  # not scored
    cache.mkdir()
    (cache / "meta.json").write_text(json.dumps({"reference": {"placement": "replicated"}}))
    assert resolve(_cfg(tmp_path, tiny_data, path=other, cache=str(cache))) == [Member("cache", other)]
    (cache / "meta.json").write_text(json.dumps({"reference": {"placement": "imported"}}))
    assert resolve(_cfg(tmp_path, tiny_data, path=other, cache=str(cache))) == [Member("imported")]
    cfg = _cfg(tmp_path, tiny_data, path=same)
    cfg.reference.path = None
    assert not has_reference(cfg) and resolve(cfg) == []


def test_a_new_source_is_one_registered_class(tmp_path, tiny_data):
    """Registered, it is asked by resolve in its order and built by make_reference: no other edit."""
    from megaslm.reference import make_reference

    class Constant(ReferenceSource):
        name, order = "constant", 0

        @classmethod
        def configured(cls, cfg):
            return True

        @classmethod
        def members(cls, cfg, *, assume_cache_scored=False):
            return [Member("constant")]

        @classmethod
        def build(cls, cfg, members, ctx):
            return ("built", members, ctx.micro_batch_size)

    SOURCES["constant"] = Constant
    try:
        cfg = _cfg(tmp_path, tiny_data, ema_decay=0.5)
        assert claim(cfg) == (Constant, [Member("constant")])
        assert make_reference(cfg, shards=None, dtype=None, micro_batch_size=3, dp_size=1) == (
            "built", [Member("constant")], 3)
    finally:
        del SOURCES["constant"]


@pytest.mark.parametrize("over, needle", [({"placement": "gpu"}, "reference.placement must be"),
                                          ({"path": ["/a", "/b"], "combine": "max"}, "reference.combine must be"),
                                          ({"ema_decay": 2.0}, "reference.ema_decay must be in (0, 1]")])
def test_each_source_validates_the_fields_it_owns(tmp_path, tiny_data, over, needle):
    from megaslm.errors import UserError

    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _cfg(tmp_path, tiny_data, **over)
