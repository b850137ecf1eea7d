"""Up-front checks of a config that cannot run, before any process group, engine or tensor exists.

`check_config(cfg)` is called by `megaslm train` (before the Trainer is built) and by `megaslm plan`. It reads only
small files (config.json of model.init_from / reference.path, the shards' meta.json) and only when they exist:
a path that does not exist yet is not an error here (`megaslm plan` runs before the data is prepared). Each failure
is one `UserError` line naming the keys and values at fault and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path

from megaslm.config import Config, first_train_path
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


def reference_hf_config(cfg: Config):
    """reference.path's config.json when an SLM run names one that exists, else None."""
    r = cfg.reference
    if cfg.objective != "slm" or not r.path or not (Path(r.path) / "config.json").is_file():
        return None
    from megaslm.model.build import load_hf_config

    return load_hf_config(r.path)


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
    ref = reference_hf_config(cfg)
    if ref is None:
        return
    ref_what = f"reference.path {cfg.reference.path}"
    check_positions(ref, cfg.train.seq_len, ref_what)
    want = vocab or cfg.model.vocab_size or (model.vocab_size if cfg.model.init_from else None)
    if want is not None and ref.vocab_size != want:
        raise UserError(f"{ref_what} has vocab_size {ref.vocab_size} but the trained model's vocabulary is {want} "
                        f"(data.train {first_train_path(cfg.data)}): the reference must share the tokenizer")
