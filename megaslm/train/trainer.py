"""`megaslm train`: the training loop on a DeepSpeed engine.

One path for every objective: batch -> per-token losses of the trained model (chunked loss head) -> reference
losses (SLM only) -> objective (mean CE over all tokens, or over the selected ones) -> engine.backward/step.
Re-running the same command resumes from the latest complete checkpoint in the run directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megaslm.atomic import write_json
from megaslm.config import Config, dump_config, first_train_path, resolve_path, train_components, valid_sets
from megaslm.data.loader import PackedLoader, model_inputs
from megaslm.data.mixture import Component, MixtureLoader
from megaslm.data.shards import ShardSet, check_compatible
from megaslm.errors import UserError
from megaslm.loss import NaNScoreError
from megaslm.loss.metrics import Metrics
from megaslm.loss.objective import compute_objective, plan_step, slm_ratio
from megaslm.model.build import TokenLossModel, create_model, model_summary, zero_stage
from megaslm.monitor import Monitor, device_peak_tflops, flops_per_token
from megaslm.parallel import dist as mdist
from megaslm.parallel import tensor as tp
from megaslm.parallel.groups import ParallelGroups
from megaslm.precision import training_dtype
from megaslm.train import checkpoint
from megaslm.train.callbacks import Callback, callback_states, load_callback_states
from megaslm.train.faults import corrupt_loss, maybe_fail
from megaslm.train.guard import SkipGuard, nan_step
from megaslm.train.halt import RunHalted
from megaslm.train.preempt import Preemption
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
    """Weight decay on matrices only; norms and biases are not decayed."""
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
                             document_mask=d.document_mask)
    return PackedLoader(shards, cfg.train.seq_len, cfg.train.micro_batch_size, dp_rank=groups.dp_rank,
                        dp_size=groups.dp_size, seed=cfg.train.seed if train else 0,
                        with_source=train and d.track_sources, eval_only=not train, document_mask=d.document_mask)


def name_sources(rec: dict, names: list[str]) -> dict:
    """Per-source metrics of a mixture under their names: tokens/<i> -> tokens/<names[i]> (and selected_frac).
    With data.track_sources the names are "<component>/<file index>", and each component's totals are added as
    tokens/<component> and selected_frac/<component> (selected over total)."""
    out = {k: v for k, v in rec.items() if not k.startswith(("tokens/", "selected_frac/"))}
    sums: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        n = rec.get(f"tokens/{i}")
        if n is None:
            continue
        out[f"tokens/{name}"] = n
        frac = rec.get(f"selected_frac/{i}")
        if frac is not None:
            out[f"selected_frac/{name}"] = frac
        if "/" in name:
            total = sums.setdefault(name.split("/")[0], [0.0, 0.0])
            total[0] += n
            total[1] += (frac or 0.0) * n
    for comp, (n, sel) in sums.items():
        out[f"tokens/{comp}"] = n
        if any(k.startswith("selected_frac/") for k in rec) and n > 0:
            out[f"selected_frac/{comp}"] = sel / n
    return out


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


def build_reference(cfg: Config, data: Data, groups: ParallelGroups, dtype: torch.dtype, model: Model):
    """The SLM reference (megaslm.reference: cache, online engine, ensemble or EMA of `model`; one interface), or
    None when the objective needs none (CLM, `slm.score: loss`). A mixture's reference is checked against its first
    component (all share one tokenizer); config validation keeps reference.cache away from mixtures and document
    masking."""
    from megaslm.reference import make_reference, needs_reference

    if not needs_reference(cfg):
        return None
    return make_reference(cfg, shards=data.train, vocab_size=data.vocab, dtype=dtype,
                          micro_batch_size=cfg.train.micro_batch_size, dp_size=groups.dp_size,
                          mpu=groups if groups.tp_size > 1 else None, tp_group=groups.tp_group,
                          tp_size=groups.tp_size, trained_lm=model.engine.module.lm,
                          zero_stage=zero_stage(model.ds_config))


def write_run_files(run_dir: Path, cfg: Config, run_info: dict, model: Model) -> None:
    """Rank 0: the resolved config, run_info.json, the DeepSpeed config, the TP layout and the HF config."""
    dump_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "run_info.json", run_info)
    write_json(run_dir / "ds_config.json", model.ds_config)
    if model.tp_layout is not None:
        tp.write_layout(run_dir, model.tp_layout)
    else:  # a stale layout would make export split a T = 1 checkpoint
        (run_dir / tp.LAYOUT_FILE).unlink(missing_ok=True)
    model.hf_config.save_pretrained(run_dir / "hf_config")


class Trainer:
    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None):
        self.cfg = cfg
        # First: a stop signal that arrives while the engines are built is honoured after the first step.
        self.preemption = Preemption()
        mdist.init_distributed()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        ds_base = load_ds_json(cfg)
        tp.check_parallel_setup(cfg.parallel.tensor, self.world, zero_stage(ds_base),
                                f"deepspeed.config {cfg.deepspeed.config}",
                                "use a ZeRO-1 or ZeRO-2 config (e.g. ds_configs/zero2.json) or parallel.tensor=1")
        self.groups = g = ParallelGroups(cfg.parallel.tensor)
        self.is_main = self.rank == 0
        self.run_dir = Path(cfg.run.dir).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        tp.check_resume(self.run_dir, bool(checkpoint.candidates(self.ckpt_root, cfg.train.resume_from)),
                        cfg.parallel.tensor)
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()

        torch.manual_seed(cfg.train.seed)
        self.dtype = training_dtype(cfg)
        self.device = mdist.device()

        self.data = build_data(cfg)
        self.train_shards = self.data.train
        self.loader = make_loader(cfg, self.data.components or self.data.train, g, train=True)
        # Per-source ids the objective counts: a mixture's names, or the shards' input files (track_sources).
        self.source_names = getattr(self.loader, "source_names", None)
        if self.source_names is None and cfg.data.track_sources:
            self.source_names = [str(i) for i in range(len(self.train_shards.sources))]
        self.model = build_model(cfg, self.data, g, ds_base, self.dtype)
        self.engine, self.scheduler = self.model.engine, self.model.scheduler
        self.ds_config, self.lm_config, self.summary = self.model.ds_config, self.model.hf_config, self.model.summary
        self.reference = build_reference(cfg, self.data, g, self.dtype, self.model)
        self.guard = SkipGuard(cfg.train.max_skipped_steps, cfg.train.spike_skip_sigma, cfg.train.spike_window)
        self.callbacks: list[Callback] = [self.guard, *(callbacks or [])]
        if isinstance(self.reference, Callback):  # an EMA reference updates after each step, saved with the run
            self.callbacks.append(self.reference)

        # Resume.
        self.step = 0
        state = checkpoint.resume(self.engine, self.ckpt_root, cfg.train.resume_from, self._say)
        if state is not None:
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
            load_callback_states(self.callbacks, state.get("callbacks"))
        self.resumed_from = state["tag"] if state else None

        self.run_info = {"world_size": self.world, "dp_size": g.dp_size, "tp_size": g.tp_size,
                         "dtype": str(self.dtype).replace("torch.", ""), "backend": mdist.backend(),
                         "model": self.summary, "objective": cfg.objective, "zero_stage": zero_stage(self.ds_config),
                         "slurm": slurm_info(), "tokenizer_fingerprint": self.train_shards.fingerprint,
                         "reference_placement": self.reference.placement if self.reference else None}
        if self.is_main:
            write_run_files(self.run_dir, cfg, self.run_info, self.model)
        self.monitor = Monitor(str(self.run_dir), cfg, self.is_main, self.step,
                               {**cfg.to_dict(), "run_info": self.run_info})

        self.tokens_per_step = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum * g.dp_size
        n_params = self.summary["params"]
        self.flops_per_token = flops_per_token(n_params, self.summary["layers"], self.summary["hidden"],
                                               cfg.train.seq_len)
        if self.reference is not None:  # one forward of the reference per token (2N + attention, as `plan`)
            self.flops_per_token += self.reference.forward_flops_per_token(cfg.train.seq_len)
        self.peak_tflops = cfg.train.peak_tflops or device_peak_tflops()

    # ------------------------------------------------------------------ one optimizer step
    def _objective_now(self) -> tuple[str, float]:
        """(objective, ratio) of the step about to be taken: CLM before slm.start_step, then the ratio schedule."""
        if self.cfg.objective != "slm":
            return "clm", 1.0
        s = self.cfg.slm
        ratio = slm_ratio(s.ratio, self.step, s.start_step, s.ratio_warmup_steps)
        return ("clm", 1.0) if ratio is None else ("slm", ratio)

    def _micro_step(self, batch: dict, objective: str, ratio: float, norm, last: bool = False) -> Metrics:
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        extra = model_inputs(batch, self.device)
        token_loss = corrupt_loss(self.engine(input_ids, labels, **extra), self.step + 1, self.rank)  # FAULT only
        ref_loss = None
        if self.reference is not None and objective == "slm":
            ref_loss = self.reference.losses_for({"input_ids": input_ids, "labels": labels, "index": batch["index"],
                                                  **extra})
        source = batch.get("source")
        s = self.cfg.slm
        try:
            loss, stats = compute_objective(
                token_loss, ref_loss, labels != -100, objective=objective, ratio=ratio, scope=s.scope,
                dp_group=self.groups.dp_group, weighting=s.weighting, score=s.score, temperature=s.temperature,
                step=norm, source=source.to(self.device) if source is not None else None,
                num_sources=len(self.source_names) if source is not None else 0,
                # The stop check rides on the last micro-step's metrics all-reduce (no collective of its own).
                stop_requested=self.preemption.requested() if last else None)
        except NaNScoreError:  # SLM's selection refuses NaN losses, on every rank at once (a stop waits a step)
            loss, stats = nan_step(token_loss)
        self.guard.observe(stats)  # before the boundary step(), which applies or skips the update
        self.engine.backward(loss)
        self.engine.step()
        return stats

    def train_step(self) -> dict:
        self.engine.train()
        for cb in self.callbacks:
            cb.pre_step(self)
        t0 = time.time()
        # The step's batches first: their label counts fix the step's normaliser (one all-reduce) before any
        # forward, so micro-steps with different numbers of labelled tokens weigh by tokens. With one micro-step
        # the objective's own metrics all-reduce yields the same normaliser: no collective of its own then.
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        objective, ratio = self._objective_now()
        norm = None
        if len(batches) > 1:
            norm = plan_step([b["labels"].to(self.device) != -100 for b in batches],
                             weighting=self.cfg.slm.weighting if objective == "slm" else "clm", ratio=ratio,
                             scope=self.cfg.slm.scope, dp_group=self.groups.dp_group)
        n = len(batches)
        per_micro = [self._micro_step(b, objective, ratio, norm, last=i == n - 1)
                     for i, b in enumerate(batches)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.time() - t0
        self.step += 1
        rec = dict(Metrics.combine(per_micro))
        if self.cfg.objective == "slm":
            rec["slm_ratio"] = ratio
        # Ranks that asked to stop, all-reduced with the last micro-step's metrics: every rank decides alike.
        self.stop_requested = rec.pop("stop_requested", 0) > 0
        rec["step"] = self.step
        rec["lr"] = self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.train.lr
        gn = self.engine.get_global_grad_norm()
        rec["grad_norm"] = float(gn) if gn is not None else None
        rec["step_time"] = dt
        rec["tokens_per_s"] = self.tokens_per_step / dt
        rec["tflops_per_device"] = self.flops_per_token * rec["tokens_per_s"] / self.world / 1e12
        if self.peak_tflops:
            rec["mfu"] = rec["tflops_per_device"] / self.peak_tflops
        if "n_selected" in rec:
            rec["selected_tokens_per_s"] = rec["n_selected"] / dt
        rec["tokens_seen"] = self.step * self.tokens_per_step
        rec["epoch"] = self.loader.epoch
        if isinstance(self.loader, MixtureLoader):
            rec = name_sources(rec, self.source_names)
            rec.update({f"epoch/{c.name}": e for c, e in zip(self.loader.components, self.loader.epochs)})
        for cb in self.callbacks:
            cb.post_step(self, rec)
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Mean CE over the labelled tokens of each validation set: {name: loss} in config order (None for a
        set with no labelled token)."""
        self.engine.eval()
        out = {}
        for name, shards in self.data.valid.items():
            loader = make_loader(self.cfg, shards, self.groups, train=False)
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            for batch in loader.eval_batches(self.cfg.data.valid_sequences):
                labels = batch["labels"].to(self.device)
                token_loss = self.engine(batch["input_ids"].to(self.device), labels, **model_inputs(batch, self.device))
                total[0] += token_loss.double().sum()
                total[1] += (labels != -100).sum()
            dist.all_reduce(total, group=self.groups.dp_group)  # sums over ranks: every rank gets the same loss
            out[name] = (total[0] / total[1]).item() if total[1] > 0 else None
        self.engine.train()
        return out

    def validation_metrics(self) -> dict:
        """val_loss (the first set's, so existing tools keep working) and, for a data.valid mapping,
        val_loss/<name> for every set."""
        losses = self.evaluate()
        rec = {"val_loss": next(iter(losses.values()))}
        if isinstance(self.cfg.data.valid, dict):
            rec.update({f"val_loss/{k}": v for k, v in losses.items()})
        return rec

    def save(self) -> None:
        state = {"step": self.step, "loader": self.loader.state_dict(), "objective": self.cfg.objective,
                 "callbacks": callback_states(self.callbacks)}
        checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        if self.is_main:
            where = f"resumed from {self.resumed_from}" if self.resumed_from else "new run"
            print(f"megaslm: {where}: step {self.step}/{t.steps}, world {self.world} (dp {self.groups.dp_size} x "
                  f"tp {self.groups.tp_size}), {self.summary['arch']} {self.summary['params'] / 1e6:.2f}M params, "
                  f"objective {cfg.objective}, ZeRO-{zero_stage(self.ds_config)}, {self.run_info['dtype']}, "
                  f"run dir {self.run_dir}", flush=True)
        for cb in self.callbacks:
            cb.on_train_start(self)
        saved_at = self.step
        while self.step < t.steps:
            rec = self.train_step()
            maybe_fail("crash_after_step", self.step)
            last = self.step == t.steps
            if self.data.valid and ((t.eval_every and self.step % t.eval_every == 0) or last):
                rec.update(self.validation_metrics())
            if self.step % t.log_every == 0 or last or "val_loss" in rec or "eval/seconds" in rec:
                self.monitor.log(rec, _console_line(rec, t.steps))
            stop = self.stop_requested
            if (t.save_every and self.step % t.save_every == 0) or last or stop:
                self.save()
                saved_at = self.step
            if stop:
                if self.is_main:
                    print(f"megaslm: stop signal received: checkpoint saved at step {self.step}", flush=True)
                self._end()
                return self.preemption.after_checkpoint(self.is_main)
        if saved_at != self.step:  # a resumed run that had already finished
            self.save()
        if self.is_main:
            print(f"megaslm: done at step {self.step}; checkpoints in {self.ckpt_root}; metrics in "
                  f"{self.run_dir / 'metrics.jsonl'}", flush=True)
        self._end()
        return 0

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def _end(self) -> None:
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.monitor.close()


def _console_line(rec: dict, total: int) -> str:
    parts = [f"step {rec['step']}/{total}", f"loss {rec['loss']:.4f}"]
    if "loss_all" in rec and "selected_frac" in rec:
        ref = f" ref {rec['ref_loss']:.4f}" if "ref_loss" in rec else ""
        parts.append(f"loss_all {rec['loss_all']:.4f}{ref} sel {rec['selected_frac']:.2f}")
    if rec.get("val_loss") is not None:
        parts.append(f"val_loss {rec['val_loss']:.4f}")
    parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"{rec['tokens_per_s']:.0f} tok/s")
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def config_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks the config asks for."""
    callbacks: list[Callback] = []
    if cfg.train.token_view_every:
        from megaslm.analyze.token_view import TokenView

        callbacks.append(TokenView(cfg.train.token_view_every))
    if cfg.train.profile_steps:
        from megaslm.train.profile import StepProfiler

        callbacks.append(StepProfiler(*cfg.train.profile_steps))
    if cfg.eval.tasks:  # downstream lm-eval tasks (megaslm/eval/callback.py)
        from megaslm.eval.callback import DownstreamEval

        callbacks.append(DownstreamEval(cfg.eval))
    return callbacks


def train(cfg: Config) -> int:
    trainer = Trainer(cfg, config_callbacks(cfg))
    code = trainer.run()
    dist.barrier()
    return code


def main_entry(cfg: Config) -> int:
    try:
        return train(cfg)
    except RunHalted:  # every rank stopped on purpose; rank 0 printed why
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
