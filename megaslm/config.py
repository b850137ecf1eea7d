"""Typed run configuration: YAML file + `--set section.key=value` overrides.

The dataclasses below are the single source of truth for every key, its type and its default. Unknown keys,
wrong types and bad values are errors (`UserError`) that name the key path and the file. The resolved config is
written into the run directory, so a run can always be reproduced from what it wrote.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megaslm.atomic import write_text
from megaslm.errors import UserError
# The typed loading of the dataclasses below:
from megaslm.typed_config import Source, _apply_override, _build, load_yaml, where

CHECKPOINT_TAG_RE = re.compile(r"step_\d{8}")  # the directory name of a checkpoint (megaslm/train/checkpoint.py)

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("tiny", "tinyllama-1.1b", "llama2-7b", "mistral-7b")


@dataclass
class RunConfig:
    dir: str = ""  # required: checkpoints, metrics.jsonl, config.yaml and wandb files go here
    name: str | None = None  # defaults to the run directory's name
    take_over: bool = False  # take the run directory's lease even from a run that looks live (`train --force`)
    lease_stale_after_s: float = 300.0  # a lease whose heartbeat is older is taken over (megaslm/lease.py)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    init_from: str | None = None  # a local Hugging Face checkpoint directory (overrides preset)
    vocab_size: int | None = None  # default: the shards' vocab size
    activation_checkpointing: bool = False
    dtype: str = "auto"  # auto: bf16 on GPUs that have it, else fp32


@dataclass
class MixtureComponent:
    path: str = ""  # a shard directory written by `megaslm prepare`
    weight: float = 1.0  # share of training sequences (weights are normalized to sum to 1)
    name: str | None = None  # metric suffix (tokens/<name>); default: the directory's name


@dataclass
class DataConfig:
    # required: a shard directory, or a mixture: a list of {path, weight, name} (see megaslm/data/mixture.py)
    train: str | list[MixtureComponent] = ""
    valid: str | dict[str, str] | None = None  # a shard directory, or {name: directory} -> val_loss/<name>
    tokenizer: str | None = None  # copied into exports; default: the tokenizer recorded in the shards' meta
    valid_sequences: int = 64  # sequences used for each validation pass
    track_sources: bool = False  # log per-source token counts / selected fraction
    document_mask: bool = False  # attention stops at document boundaries; positions restart per document


@dataclass
class TrainConfig:
    steps: int = 100
    seq_len: int = 256
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # 0: keep all (what `megaslm analyze dynamics` reads)
    eval_every: int = 0  # 0: only at the end (if data.valid is set)
    log_every: int = 1
    token_view_every: int = 0  # 0: off; else log the token view of a fixed held-out sample every N steps
    peak_tflops: float | None = None  # per device, for MFU; default from a table of known GPUs
    resume_from: str = "latest"  # latest (newest checkpoint that verifies) | a tag (step_00000300) | none
    max_skipped_steps: int = 10  # stop after this many consecutive skipped steps (non-finite loss/grad or spike)
    spike_skip_sigma: float | None = None  # skip a step whose loss is this many std devs above the window mean
    spike_window: int = 128  # steps in the loss window of spike_skip_sigma (judged once half full)
    profile_steps: list[int] = field(default_factory=list)  # [N, M]: torch.profiler trace of steps N..M


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled; the WANDB_MODE environment variable wins
    project: str = "megaslm"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class SLMConfig:
    ratio: float = 0.6  # keep this fraction of labelled tokens (paper: 0.6 at 1.1B, 0.7 at 7B)
    scope: str = "global"  # sequence | rank | global
    # The choices of weighting and score are the rules of megaslm/loss/rules/ (docs/objectives.md lists them).
    weighting: str = "topk"  # topk: the paper's hard top-k mask | soft: sigmoid((score - t) / temperature) | ...
    temperature: float = 0.5  # of soft weighting, in nats of score; -> 0 gives top-k
    score: str = "excess"  # excess: loss - reference loss (Rho-1) | loss: the model's own loss (no reference) | ...
    start_step: int = 0  # plain CLM for optimizer steps < start_step, SLM after
    ratio_warmup_steps: int = 0  # after start_step the ratio goes linearly from 1.0 to `ratio` over these steps


@dataclass
class ReferenceConfig:
    path: str | list[str] | None = None  # local Hugging Face directory of the reference model, or a list of them
    combine: str = "mean"  # mean | min of the per-token losses of several references (reference.path a list)
    ema_decay: float | None = None  # reference = EMA of the trained model (0 < d <= 1; 1: the initial model)
    placement: str = "auto"  # auto | replicated | zero3 | zero3_offload
    cache: str | None = None  # directory of reference losses written by `megaslm score` (used instead of the model)


@dataclass
class LossHeadConfig:
    """The LM-head cross-entropy (megaslm/loss/per_token_ce.py; docs/loss_head.md). Logits are computed in
    [chunk_tokens, vocab_block] fp32 tiles, never whole."""

    chunk_tokens: int | None = None  # tokens per tile; null: every token of the micro-batch in one chunk
    vocab_block: int | None = None  # vocabulary rows per tile; null: max(128, hidden_size / 2)
    keep_logits_mib: float = 0.0  # MiB of fp32 tiles kept from forward to backward (memory for speed); 0: recompute


@dataclass
class ParallelConfig:
    tensor: int = 1


@dataclass
class EvalConfig:
    """Downstream lm-eval tasks during training (megaslm/eval/callback.py; docs/eval.md)."""

    tasks: list[str] = field(default_factory=list)  # e.g. [arc_easy, sciq, gsm8k_bpb]; empty: no evaluation
    every: int = 0  # every N optimizer steps; 0: only at the end (with at_end)
    at_end: bool = True  # also after the last step
    limit: int | None = 200  # first N examples of each task; null: all
    num_fewshot: int | None = None  # null: each task's own
    include_path: list[str] = field(default_factory=list)  # directories / YAML files of your own tasks
    batch_tokens: int = 8192  # padded tokens per forward


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    objective: str = "clm"  # clm | slm
    slm: SLMConfig = field(default_factory=SLMConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss_head: LossHeadConfig = field(default_factory=LossHeadConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: Config, src: str = "config") -> Config:
    def bad(key: str, msg: str) -> UserError:
        return UserError(f"{where(src, key)}: {key} {msg}")

    if not cfg.run.dir:
        raise bad("run.dir", "is required (the run directory)")
    if cfg.run.lease_stale_after_s < 10:
        raise bad("run.lease_stale_after_s", f"must be >= 10 (seconds), got {cfg.run.lease_stale_after_s}")
    if not cfg.data.train:
        raise bad("data.train", "is required (a shard directory written by `megaslm prepare`, or a list of "
                                "{path, weight, name})")
    _validate_data(cfg.data, bad)
    if cfg.model.init_from is None and cfg.model.preset not in PRESETS:
        raise bad("model.preset", f"must be one of {', '.join(PRESETS)}, got {cfg.model.preset!r}")
    if cfg.model.dtype not in ("auto", "bf16", "fp32"):
        raise bad("model.dtype", f"must be auto, bf16 or fp32, got {cfg.model.dtype!r}")
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < 2:
        raise bad("model.vocab_size", f"must be >= 2, got {cfg.model.vocab_size}")
    t = cfg.train
    for name in ("steps", "seq_len", "micro_batch_size", "grad_accum"):
        if getattr(t, name) < 1:
            raise bad(f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    for name in ("save_every", "eval_every", "warmup_steps", "token_view_every"):
        if getattr(t, name) < 0:
            raise bad(f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    if t.log_every < 1:
        raise bad("train.log_every", f"must be >= 1, got {t.log_every}")
    if t.keep_checkpoints < 0:
        raise bad("train.keep_checkpoints", f"must be >= 0 (0 keeps all), got {t.keep_checkpoints}")
    _validate_resilience(t, bad)
    if not t.lr > 0:
        raise bad("train.lr", f"must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise bad("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if t.grad_clip < 0:
        raise bad("train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    if cfg.data.valid_sequences < 1:
        raise bad("data.valid_sequences", f"must be >= 1, got {cfg.data.valid_sequences}")
    from megaslm.loss.choices import OBJECTIVES, SCOPES

    if cfg.objective not in OBJECTIVES:
        raise bad("objective", f"must be {_choice(OBJECTIVES)}, got {cfg.objective!r}")
    if not 0 < cfg.slm.ratio <= 1:
        raise bad("slm.ratio", f"must be in (0, 1], got {cfg.slm.ratio}")
    if cfg.slm.scope not in SCOPES:
        raise bad("slm.scope", f"must be {_choice(SCOPES)}, got {cfg.slm.scope!r}")
    _validate_slm(cfg, bad)
    if cfg.wandb.mode not in ("online", "offline", "disabled"):
        raise bad("wandb.mode", f"must be online, offline or disabled, got {cfg.wandb.mode!r}")
    if cfg.parallel.tensor < 1:
        raise bad("parallel.tensor", f"must be >= 1, got {cfg.parallel.tensor}")
    for name in ("chunk_tokens", "vocab_block"):
        value = getattr(cfg.loss_head, name)
        if value is not None and value < 1:
            raise bad(f"loss_head.{name}", f"must be >= 1 or null (automatic), got {value}")
    if not cfg.loss_head.keep_logits_mib >= 0:
        raise bad("loss_head.keep_logits_mib", f"must be >= 0 (0: always recompute), got {cfg.loss_head.keep_logits_mib}")
    _validate_eval(cfg.eval, bad)
    return cfg


def _choice(names) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


def _validate_eval(e: EvalConfig, bad) -> None:
    if e.every < 0:
        raise bad("eval.every", f"must be >= 0 (0: only at the end), got {e.every}")
    if e.limit is not None and e.limit < 1:
        raise bad("eval.limit", f"must be >= 1 or null (all examples), got {e.limit}")
    if e.num_fewshot is not None and e.num_fewshot < 0:
        raise bad("eval.num_fewshot", f"must be >= 0 or null, got {e.num_fewshot}")
    if e.batch_tokens < 1:
        raise bad("eval.batch_tokens", f"must be >= 1, got {e.batch_tokens}")


def reference_paths(cfg: Config) -> list[str]:
    """reference.path as a list (empty when unset)."""
    p = cfg.reference.path
    return [] if not p else [p] if isinstance(p, str) else list(p)


def _validate_slm(cfg: Config, bad) -> None:
    # The registries of the objective components and the reference sources, each checking the fields it owns;
    # torch-free, so that a bad config is refused before torch loads (tests/unit/test_lazy_imports.py).
    from megaslm.loss.rules import SCORES, WEIGHTINGS
    from megaslm.reference.sources import SOURCES

    s = cfg.slm
    for source in SOURCES.values():
        source.validate(cfg, bad)
    choices = {"slm.weighting": (s.weighting, tuple(WEIGHTINGS)), "slm.score": (s.score, tuple(SCORES))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise bad(key, f"must be {' or '.join(allowed)}, got {value!r}")
    for weighting in WEIGHTINGS.values():  # each checks the fields it owns, set whichever weighting is chosen
        weighting.validate(s, bad)
    SCORES[s.score].validate(cfg, bad)  # what the chosen score needs (a reference, ...)
    for key in ("start_step", "ratio_warmup_steps"):
        if getattr(s, key) < 0:
            raise bad(f"slm.{key}", f"must be >= 0, got {getattr(s, key)}")


def _validate_resilience(t: TrainConfig, bad) -> None:
    if t.resume_from not in ("latest", "none") and not CHECKPOINT_TAG_RE.fullmatch(t.resume_from):
        raise bad("train.resume_from", f"must be latest, none or a checkpoint tag like step_00000300, "
                  f"got {t.resume_from!r}")
    if t.max_skipped_steps < 1:
        raise bad("train.max_skipped_steps", f"must be >= 1, got {t.max_skipped_steps}")
    if t.spike_skip_sigma is not None and not t.spike_skip_sigma > 0:
        raise bad("train.spike_skip_sigma", f"must be > 0 (or null: off), got {t.spike_skip_sigma}")
    if t.spike_window < 4:
        raise bad("train.spike_window", f"must be >= 4, got {t.spike_window}")
    p = t.profile_steps
    if p and not (len(p) == 2 and 1 <= p[0] <= p[1]):
        raise bad("train.profile_steps", f"must be [N, M] with 1 <= N <= M (or []: off), got {p}")


def _validate_data(d: DataConfig, bad) -> None:
    """Mixture components get their default names (so the resolved config shows them); names are unique."""
    if isinstance(d.train, list):
        for i, c in enumerate(d.train):
            if not c.path:
                raise bad(f"data.train[{i}].path", "is required (a shard directory)")
            if not c.weight > 0:
                raise bad(f"data.train[{i}].weight", f"must be > 0, got {c.weight}")
            c.name = c.name or os.path.basename(os.path.normpath(c.path))
        names = [c.name for c in d.train]
        if len(set(names)) != len(names):
            raise bad("data.train", f"component names must differ, got {names} (set name: for each)")
    if isinstance(d.valid, dict):
        if not d.valid:
            raise bad("data.valid", "is an empty mapping (give name: directory pairs, or leave it out)")
        for name, path in d.valid.items():
            if not path:
                raise bad(f"data.valid.{name}", "is empty (a shard directory)")


def train_components(d: DataConfig) -> list[MixtureComponent] | None:
    """The mixture of data.train, or None when it is one directory."""
    return d.train if isinstance(d.train, list) else None


def first_train_path(d: DataConfig) -> str:
    """The shard directory that fixes the tokenizer: data.train, or a mixture's first component."""
    return d.train[0].path if isinstance(d.train, list) else d.train


def valid_sets(d: DataConfig) -> dict[str, str]:
    """data.valid as {name: directory}: a plain directory is named "valid"; none gives {}."""
    if d.valid is None or d.valid == "":
        return {}
    return dict(d.valid) if isinstance(d.valid, dict) else {"valid": d.valid}


def from_dict(data: dict, src: str = "config") -> Config:
    return validate(_build(Config, data, "", src), src)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `section.key=value` overrides, validate, and return it."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: a directory, not a config file (give the YAML file, e.g. {p}/config.yaml)")
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = load_yaml(p.read_text(), str(p)) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file (not UTF-8)") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections")
    given = {}
    for item in overrides or []:
        given[_apply_override(data, item)] = item
    return from_dict(data, Source(str(p), given))


def resolve_path(path: str) -> Path:
    """Find a file named relative to the cwd, else relative to the megaslm checkout (for ds_configs/...)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    if alt.exists():
        return alt
    named = REPO_ROOT / "ds_configs" / f"{path}.json"  # `deepspeed.config: zero3` is accepted too
    if named.exists():
        return named
    return p


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
