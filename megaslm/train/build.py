"""The parts of a training run, built once and in one place each (torchtitan's build functions): the DeepSpeed
config (pure: `megaslm plan` calls it without building anything), the shard sets, the loaders, the model engine,
and the files a run writes beside its checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from megaslm import run_files
from megaslm.atomic import write_json
from megaslm.config import Config, dump_config, first_train_path, resolve_path, train_components, valid_sets
from megaslm.data.loader import PackedLoader
from megaslm.data.mixture import Component, MixtureLoader
from megaslm.data.shards import ShardSet, check_compatible
from megaslm.errors import UserError
from megaslm.model.build import TokenLossModel, create_model, model_summary, zero_stage
from megaslm.parallel import dist as mdist
from megaslm.parallel import tensor as tp
from megaslm.parallel.groups import ParallelGroups
from megaslm.train.schedule import make_scheduler


def load_ds_json(cfg: Config) -> dict:
    """The JSON file named by deepspeed.config, as written."""
    path = resolve_path(cfg.deepspeed.config)
    if not path.is_file():
        raise UserError(f"deepspeed.config: file not found: {cfg.deepspeed.config}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed.config {path}: not valid JSON: {e}") from None


def build_ds_config(cfg: Config, base: dict, dp_size: int, dtype: torch.dtype) -> dict:
    """`base` (the deepspeed.config JSON) with batch sizes, precision, clipping and optimizer from the YAML."""
    ds = json.loads(json.dumps(base))  # a deep copy: the caller's dict stays as read
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * dp_size
    ds["gradient_clipping"] = t.grad_clip
    ds["bf16"] = {"enabled": dtype == torch.bfloat16}
    ds.pop("fp16", None)
    zero = ds.setdefault("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    params.update(lr=t.lr, betas=[t.beta1, t.beta2], eps=1e-8, weight_decay=t.weight_decay)
    if not torch.cuda.is_available() and not offload:
        params["torch_adam"] = True  # DeepSpeed's fused Adam needs CUDA
    if offload:
        ds["zero_force_ds_cpu_optimizer"] = True
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms and biases are not decayed. Without weight decay, one group: ZeRO
    steps, all-gathers and norms each group on its own (a collective and two host syncs more per step)."""
    if weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def slurm_info() -> dict:
    keys = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


@dataclass
class Data:
    """The shard sets of a run and the model vocabulary they fix. `train` is the only (or the first) training
    set: tokenizer, EOS and vocabulary come from it; `components` is the mixture (None for one directory);
    `valid` maps validation-set names to sets, in config order (empty without data.valid)."""
    train: ShardSet
    components: list[Component] | None
    valid: dict[str, ShardSet]
    vocab: int


def build_data(cfg: Config) -> Data:
    """Open and cross-check the shard sets (one tokenizer for all); the model's vocabulary follows the shards
    unless the config sets it."""
    mixture = train_components(cfg.data)
    components = [Component(c.name, ShardSet(c.path), c.weight) for c in mixture] if mixture else None
    train = components[0].shards if components else ShardSet(cfg.data.train)
    first = first_train_path(cfg.data)
    vocab = cfg.model.vocab_size or train.vocab_size
    check_compatible(train, vocab, None, f"model {cfg.model.init_from or cfg.model.preset}")
    for c in (components or [])[1:]:
        check_compatible(c.shards, vocab, train.fingerprint, f"training shards {first} (data.train[0])")
    valid = {}
    for name, path in valid_sets(cfg.data).items():
        valid[name] = ShardSet(path)
        check_compatible(valid[name], vocab, train.fingerprint, f"training shards {first}")
    return Data(train, components, valid, vocab)


def make_loader(cfg: Config, shards: ShardSet | list[Component], groups: ParallelGroups, *,
                train: bool) -> PackedLoader | MixtureLoader:
    """The one place loaders are made: the training loader (seeded order, per-source ids when tracked; a
    MixtureLoader for a list of components) or an evaluation loader (fixed order)."""
    d = cfg.data
    if isinstance(shards, list):
        return MixtureLoader(shards, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank=groups.dp_rank,
                             dp_size=groups.dp_size, seed=cfg.train.seed, track_sources=d.track_sources,
                             document_mask=d.document_mask, grad_accum=cfg.train.grad_accum)
    return PackedLoader(shards, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank=groups.dp_rank,
                        dp_size=groups.dp_size, seed=cfg.train.seed if train else 0,
                        with_source=train and d.track_sources, eval_only=not train, document_mask=d.document_mask,
                        grad_accum=cfg.train.grad_accum if train else 1)


@dataclass
class Model:
    """The trained model's engine and what the run records about it."""
    engine: object
    scheduler: object
    ds_config: dict
    hf_config: object
    summary: dict
    tp_layout: dict | None


def build_model(cfg: Config, data: Data, groups: ParallelGroups, ds_base: dict, dtype: torch.dtype) -> Model:
    """The Hugging Face model wrapped with the loss head, as a DeepSpeed training engine."""
    import deepspeed

    mpu = groups if groups.tp_size > 1 else None
    ds_config = build_ds_config(cfg, ds_base, groups.dp_size, dtype)
    if groups.tp_size > 1:
        ds_config["tensor_parallel"] = tp.autotp_section(groups.tp_size)
    lm = create_model(preset=cfg.model.preset, init_from=cfg.model.init_from, vocab_size=data.vocab,
                      ds_config=ds_config, dtype=dtype, eos_id=data.train.eos_id, mpu=mpu)
    if cfg.model.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tp.check_model_config(lm.config, groups.tp_size, f"model {cfg.model.init_from or cfg.model.preset}")
    summary = model_summary(lm)  # before AutoTP: the full (unsharded) parameter count
    head = cfg.loss_head
    model = TokenLossModel(lm, tp_group=groups.tp_group, chunk_size=head.chunk_tokens,
                           zero3=zero_stage(ds_config) == 3, vocab_block=head.vocab_block,
                           keep_bytes=int(head.keep_logits_mib * 2**20))
    sched = make_scheduler(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay), config=ds_config,
        lr_scheduler=sched, mpu=mpu)
    layout = None
    if groups.tp_size > 1:  # which parameters AutoTP split, and how: export merges the shards with it
        layout = tp.capture_layout(engine.module.lm, lm.config, groups.tp_group)
        tp.check_vocab_head(engine.module.lm, layout, groups.tp_group)
    return Model(engine, scheduler, ds_config, lm.config, summary, layout)


def write_run_files(run_dir: Path, cfg: Config, run_info: dict, model: Model) -> None:
    """Rank 0: the resolved config, run_info.json, the DeepSpeed config, the TP layout and the HF config."""
    run_dir.mkdir(parents=True, exist_ok=True)  # made by the lease under `megaslm train`; not by a Trainer alone
    dump_config(cfg, run_dir / run_files.CONFIG)
    write_json(run_dir / run_files.RUN_INFO, run_info)
    write_json(run_dir / "ds_config.json", model.ds_config)
    if model.tp_layout is not None:
        tp.write_layout(run_dir, model.tp_layout)
    else:  # a stale layout would make export split a T = 1 checkpoint
        (run_dir / tp.LAYOUT_FILE).unlink(missing_ok=True)
    model.hf_config.save_pretrained(run_dir / "hf_config")


def run_info(cfg: Config, world: int, groups: ParallelGroups, dtype: torch.dtype, model: Model, data: Data,
             reference) -> dict:
    """What run_info.json records about the run (and wandb's config)."""
    return {"world_size": world, "dp_size": groups.dp_size, "tp_size": groups.tp_size,
            "dtype": str(dtype).replace("torch.", ""), "backend": mdist.backend(), "model": model.summary,
            "objective": cfg.objective, "zero_stage": zero_stage(model.ds_config), "slurm": slurm_info(),
            "tokenizer_fingerprint": data.train.fingerprint,
            "reference_placement": reference.placement if reference else None}
