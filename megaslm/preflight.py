"""Up-front checks of a config that cannot run, before any process group, engine or tensor exists.

`check_config(cfg)` is called by `megaslm train` (before the Trainer is built) and by `megaslm plan`. It reads only
small files (config.json of model.init_from / reference.path, the shards' meta.json) and only when they exist:
a path that does not exist yet is not an error here (`megaslm plan` runs before the data is prepared). Each failure
is one `UserError` line naming the keys and values at fault and the fix.

`check_data(cfg, config_file)` is `megaslm train`'s stricter check before its run directory exists: every shard
set, model and reference path must exist and be of the right kind, and every shard set must share data.train's
tokenizer; its lines name the key and the config file.
"""

from __future__ import annotations

import json
from pathlib import Path

from megaslm.config import Config, first_train_path, reference_paths
from megaslm.errors import UserError

PLACEHOLDER_VOCAB = 32000  # architecture checks when no vocabulary is known yet (it changes no position limit)


def shards_vocab(cfg: Config) -> int | None:
    """data.train's (a mixture's first component's) vocab_size from its meta.json, when the shards are already
    prepared."""
    meta = Path(first_train_path(cfg.data)) / "meta.json"
    if not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError):
        return None  # a damaged meta.json is reported, with its path, when the shards are opened


def known_vocab(cfg: Config) -> int | None:
    return cfg.model.vocab_size or shards_vocab(cfg)


def model_hf_config(cfg: Config, vocab_size: int | None = None):
    """The trained model's Hugging Face config: model.init_from's config.json, else the preset."""
    from megaslm.model.build import load_hf_config
    from megaslm.model.presets import preset_config

    if cfg.model.init_from:
        return load_hf_config(cfg.model.init_from)
    return preset_config(cfg.model.preset, vocab_size or known_vocab(cfg) or PLACEHOLDER_VOCAB)


def reference_hf_config(cfg: Config, path: str | None = None):
    """The config.json of reference.path (or of `path`, one of a list) when an SLM run names one that exists, else
    None. For a list, the first entry unless `path` is given."""

    paths = reference_paths(cfg)
    path = path or (paths[0] if paths else None)
    if cfg.objective != "slm" or not path or not (Path(path) / "config.json").is_file():
        return None
    from megaslm.model.build import load_hf_config

    return load_hf_config(path)


def check_positions(hf_config, seq_len: int, what: str) -> None:
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and seq_len > int(limit):
        raise UserError(f"train.seq_len {seq_len} exceeds the max_position_embeddings {limit} of {what}: "
                        f"set train.seq_len <= {limit} or use a model with longer positions")


def check_config(cfg: Config) -> None:
    """Refuse what cannot run: sequence longer than a model's positions, mismatched vocabularies, bad TP split."""
    from megaslm.parallel.tensor import check_model_config

    model_what = f"model.init_from {cfg.model.init_from}" if cfg.model.init_from else f"model.preset {cfg.model.preset}"
    model = model_hf_config(cfg)
    check_positions(model, cfg.train.seq_len, model_what)
    check_model_config(model, cfg.parallel.tensor, model_what)
    vocab = shards_vocab(cfg)
    if cfg.model.init_from and vocab is not None and model.vocab_size != vocab:
        raise UserError(f"{model_what} has vocab_size {model.vocab_size} but data.train {first_train_path(cfg.data)} has "
                        f"vocab_size {vocab}: the model and the shards must share the tokenizer")
    from megaslm.reference.sources import SOURCES

    want = vocab or cfg.model.vocab_size or (model.vocab_size if cfg.model.init_from else None)
    for source in SOURCES.values():  # each reference source's share (reference/sources/)
        source.check(cfg, want)


# ---------------------------------------------------------------------------------------------- data, before a run
def path_kind(path: str, marker: str | None = None) -> str:
    """What is at `path`, in words, for messages (`marker`: the file a directory of the right kind holds)."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    if p.is_dir():
        return f"is a directory without {marker}" if marker and not (p / marker).exists() else "is a directory"
    if p.is_file():
        return f"is a file ({p.stat().st_size} bytes)"
    return "is neither a file nor a directory"


def data_paths(cfg: Config) -> list[tuple[str, str]]:
    """(key, shard directory) for every shard set of a run: data.train (or each component), then data.valid."""
    from megaslm.config import train_components, valid_sets

    comps = train_components(cfg.data)
    train = ([(f"data.train[{i}].path", c.path) for i, c in enumerate(comps)] if comps
             else [("data.train", cfg.data.train)])
    named = isinstance(cfg.data.valid, dict)
    return train + [(f"data.valid.{n}" if named else "data.valid", p) for n, p in valid_sets(cfg.data).items()]


def expect_dir(key: str, path: str, marker: str, want: str, src: str) -> None:
    """Refuse, naming the key and the config file, unless `path` is a directory holding `marker`."""
    if not (Path(path) / marker).is_file():
        raise UserError(f"{key} {path} {path_kind(path, marker)}, expected {want} ({key} in {src})")


def check_data(cfg: Config, src: str) -> None:
    """`megaslm train`, before the run directory exists: every path of the config is of the kind its key needs,
    and every shard set shares data.train's tokenizer. Each failure names the key and the config file `src`."""
    from megaslm.data.shards import META_FILE, ShardSet

    sets = {}
    for key, path in data_paths(cfg):
        expect_dir(key, path, META_FILE, "a shard directory written by `megaslm prepare`", src)
        try:
            sets[key] = ShardSet(path)
        except UserError as e:
            raise UserError(f"{key} in {src}: {e}") from None
    (first_key, first), *rest = sets.items()
    vocab = cfg.model.vocab_size or first.vocab_size
    for key, s in sets.items():
        if s.vocab_size != vocab:
            other = (f"model.vocab_size is {vocab}" if cfg.model.vocab_size else
                     f"{first_key} {first.path} has vocab_size {vocab}")
            raise UserError(f"{key} {s.path} was tokenized with vocab_size {s.vocab_size} but {other}: every shard "
                            f"set of a run must share one tokenizer ({key} in {src})")
        if s.fingerprint != first.fingerprint:
            raise UserError(f"{key} {s.path} was tokenized by another tokenizer (sha256 {s.fingerprint[:12]}..) than "
                            f"{first_key} {first.path} (sha256 {first.fingerprint[:12]}..): every shard set of a run "
                            f"must share one tokenizer ({key} in {src})")
    hf = "a Hugging Face model directory"
    if cfg.model.init_from:
        expect_dir("model.init_from", cfg.model.init_from, "config.json", hf, src)
    from megaslm.reference.sources import SOURCES

    for source in SOURCES.values():  # each reference source's share (reference/sources/)
        source.preflight(cfg, src)
