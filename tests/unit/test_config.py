"""Config loading: defaults, overrides, and errors that name the key and the file."""

import pytest
import yaml

from megaslm.config import dump_config, load_config, resolve_path
from megaslm.errors import UserError


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


MIN = {"run": {"dir": "/tmp/r"}, "model": {"preset": "tiny"}, "data": {"train": "/tmp/shards"}}


def test_minimal_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MIN))
    assert cfg.run.dir == "/tmp/r"
    assert cfg.objective == "clm"
    assert cfg.slm.ratio == 0.6 and cfg.slm.scope == "global"
    assert cfg.train.grad_accum == 1 and cfg.parallel.tensor == 1
    assert cfg.deepspeed.config == "ds_configs/zero2.json"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, MIN), ["train.steps=7", "train.lr=1e-3", "wandb.tags=[a, b]",
                                             "model.activation_checkpointing=true", "objective=slm",
                                             "reference.path=/x", "data.valid=/v"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.model.activation_checkpointing is True
    assert cfg.objective == "slm" and cfg.reference.path == "/x" and cfg.data.valid == "/v"
    cfg = load_config(write(tmp_path, MIN), ["loss_head.keep_logits_mib=512", "loss_head.vocab_block=256"])
    assert cfg.loss_head.keep_logits_mib == 512.0 and cfg.loss_head.vocab_block == 256
    assert cfg.loss_head.chunk_tokens is None


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("bogus.key=1", "unknown config key 'bogus'"),
    ("train.steps=abc", "train.steps must be an integer"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("slm.ratio=0", "slm.ratio must be in (0, 1]"),
    ("slm.ratio=1.5", "slm.ratio must be in (0, 1]"),
    ("slm.scope=batch", "slm.scope must be sequence, rank or global"),
    ("model.preset=gpt5", "model.preset must be one of"),
    ("reference.placement=gpu", "reference.placement must be"),
    ("objective=slm", "reference.path is required"),
    ("wandb.mode=loud", "wandb.mode must be"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("model.activation_checkpointing=maybe", "model.activation_checkpointing must be true or false"),
    ("parallel.tensor=0", "parallel.tensor must be >= 1"),
    ("loss_head.vocab_block=0", "loss_head.vocab_block must be >= 1 or null"),
    ("loss_head.chunk_tokens=-3", "loss_head.chunk_tokens must be >= 1 or null"),
    ("loss_head.keep_logits_mib=-1", "loss_head.keep_logits_mib must be >= 0"),
    ("loss_head.keep_logits_mib=lots", "loss_head.keep_logits_mib must be a number"),
])
def test_bad_values_name_the_key_and_file(tmp_path, override, needle):
    path = write(tmp_path, MIN)
    with pytest.raises(UserError) as e:
        load_config(path, [override])
    assert needle in str(e.value)
    # The value came from --set: the error names it, not the file (whose key the message names otherwise).
    source = str(path) if override == "objective=slm" else f"--set {override}"
    assert str(e.value).startswith(f"{source}: "), str(e.value)


def test_a_duplicated_key_is_refused_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(f"run:\n  dir: {tmp_path}/r\ntrain:\n  steps: 3\ndata:\n  train: x\ntrain:\n  lr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(e.value) == (f"{path}: key 'train' is given twice (lines 3 and 7); the second would replace the "
                            f"first: merge them")
    path.write_text(f"run:\n  dir: x\n  dir: y\n")
    with pytest.raises(UserError, match="key 'dir' is given twice \\(lines 2 and 3\\)"):
        load_config(path)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(UserError, match=f"^{tmp_path}: a directory, not a config file"):
        load_config(tmp_path)


def test_required_keys(tmp_path):
    with pytest.raises(UserError, match="run.dir is required"):
        load_config(write(tmp_path, {"data": {"train": "x"}}))
    with pytest.raises(UserError, match="data.train is required"):
        load_config(write(tmp_path, {"run": {"dir": "x"}}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MIN), ["train.steps=9", "slm.ratio=0.7"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_ds_config_names_resolve_inside_the_checkout():
    assert resolve_path("ds_configs/zero3.json").is_file()
    assert resolve_path("zero3_offload").is_file()


@pytest.mark.parametrize("overrides, needle", [
    (["slm.weighting=hard"], "slm.weighting must be topk or soft or cvar, got 'hard'"),
    (["slm.score=surprise"], "slm.score must be excess or loss or entropy or retrospective"),
    (["reference.combine=max"], "reference.combine must be mean or min"),
    (["slm.temperature=0"], "slm.temperature must be > 0"),
    (["slm.start_step=-1"], "slm.start_step must be >= 0"),
    (["slm.ratio_warmup_steps=-2"], "slm.ratio_warmup_steps must be >= 0"),
    (["reference.ema_decay=0"], "reference.ema_decay must be in (0, 1]"),
    (["reference.ema_decay=0.9", "reference.path=/r"], "drop reference.path and reference.cache"),
    (["reference.path=[/a, /b]", "reference.cache=/c"], "reference.path lists 2"),
])
def test_objective_keys_are_validated(tmp_path, overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, MIN), overrides)
    msg = str(e.value)
    assert needle in msg and (any(msg.startswith(f"--set {o}: ") for o in overrides) or str(tmp_path) in msg), msg


def test_objective_keys_parse(tmp_path):
    from megaslm.config import reference_paths

    cfg = load_config(write(tmp_path, MIN), ["objective=slm", "reference.path=[/a, /b]", "reference.combine=min",
                                             "slm.weighting=soft", "slm.temperature=0.2"])
    assert reference_paths(cfg) == ["/a", "/b"] and cfg.reference.combine == "min"
    assert load_config(write(tmp_path, MIN), ["reference.path=/a"]).reference.path == "/a"
    # No reference is needed to rank tokens by their own loss, or with an EMA self-reference.
    assert load_config(write(tmp_path, MIN), ["objective=slm", "slm.score=loss"]).slm.score == "loss"
    assert load_config(write(tmp_path, MIN), ["objective=slm", "reference.ema_decay=1"]).reference.ema_decay == 1.0


def test_mixture_and_named_validation_sets_parse_default_and_round_trip(tmp_path):
    data = {**MIN, "data": {"train": [{"path": "/s/web/", "weight": 3}, {"path": "/s/code", "weight": 1, "name": "c"}],
                            "valid": {"clean": "/v/clean", "web": "/v/web"}, "document_mask": True}}
    cfg = load_config(write(tmp_path, data))
    assert [(c.name, c.path, c.weight) for c in cfg.data.train] == [("web", "/s/web/", 3.0), ("c", "/s/code", 1.0)]
    assert cfg.data.valid == {"clean": "/v/clean", "web": "/v/web"} and cfg.data.document_mask is True
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    over = load_config(write(tmp_path, MIN), ["data.train=[{path: /a, weight: 2}, {path: /b}]"])
    assert [(c.name, c.weight) for c in over.data.train] == [("a", 2.0), ("b", 1.0)]


@pytest.mark.parametrize("train, valid, needle", [
    ([{"path": "/a", "weight": 0}], None, "data.train[0].weight must be > 0"),
    ([{"path": "/x/a"}, {"path": "/y/a"}], None, "component names must differ"),
    ([{"pth": "/a"}], None, "unknown config key 'data.train[0].pth'"),
    ([{"weight": 1}], None, "data.train[0].path is required"),
    ("/a", {}, "data.valid is an empty mapping"),
    ("/a", {"clean": ["/v"]}, "data.valid.clean must be a string"),
])
def test_bad_mixtures_name_the_key(tmp_path, train, valid, needle):
    data = {**MIN, "data": {"train": train, **({"valid": valid} if valid is not None else {})}}
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, data))
    assert needle in str(e.value)


def test_reference_cache_refused_with_mixture_or_document_mask(tmp_path):
    base = {**MIN, "objective": "slm", "reference": {"cache": "/c"}}
    for data in ({"train": [{"path": "/a"}]}, {"train": "/a", "document_mask": True}):
        with pytest.raises(UserError, match="reference.cache cannot be used"):
            load_config(write(tmp_path, {**base, "data": data}))
