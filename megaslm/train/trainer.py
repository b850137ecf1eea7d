"""`megaslm train`: the training loop on a DeepSpeed engine.

One path for every objective: batch -> per-token losses of the trained model (chunked loss head, plus the extra
outputs the objective's score asks for) -> reference losses (scores that read them) -> the objective (a
megaslm.loss.Objective built once from the config) -> engine.backward/step. Side concerns are callbacks
(megaslm/callbacks.py): the skip guard, fault injection, validation and logging here, and whatever the caller
adds (token view, profiler, an EMA reference). The caller also builds the reference (megaslm/launch.py), so this
package imports neither megaslm.reference nor megaslm.analyze. The parts of a run are built in train/build.py.
Re-running the same command resumes from the latest complete checkpoint in the run directory.
"""

from __future__ import annotations


import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megaslm import run_files
from megaslm.callbacks import Callback, StateRegistry
from megaslm.config import Config
from megaslm.data.loader import model_inputs
from megaslm.data.shards import ShardChanged
from megaslm.faults import FaultInjection
from megaslm.lease import holding, lost_message
from megaslm.loss import Objective
from megaslm.loss.metrics import Metrics
from megaslm.loss.objective import slm_ratio
from megaslm.model.build import zero_stage
from megaslm.monitor import Monitor
from megaslm.parallel import tensor as tp
from megaslm.protocols import Loader, ReferenceLosses
from megaslm.runtime import start_run
from megaslm.train import checkpoint, config_change
from megaslm.train.build import build_data, build_model, load_ds_json, make_loader, run_info, write_run_files
from megaslm.train.guard import SkipGuard
from megaslm.train.halt import RunHalted, halt
from megaslm.train.records import Logging, MixtureMetrics, Throughput, Validation

ReferenceFactory = Callable[["Trainer"], ReferenceLosses]
# The summed stop flag: ranks with a stop signal + LEASE_LOST (rank 0's lost lease) + DATA_ERROR per rank whose
# shard was cut; exact in float32 for up to 3 such ranks, and any more still reads as >= DATA_ERROR.
LEASE_LOST = float(1 << 20)
DATA_ERROR = float(1 << 22)


class _LoaderState:
    """The loader's entry in the state registry (whichever loader the trainer holds when it saves)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return self.trainer.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.loader.load_state_dict(state)


class Trainer:
    def __init__(self, cfg: Config, callbacks: list[Callback] | None = None,
                 reference: ReferenceFactory | None = None):
        """callbacks: extra callbacks (after the skip guard); reference: builds the objective's reference from the
        built trainer (megaslm.launch.build_reference), needed when the objective's score reads one."""
        self.cfg = cfg
        ds_base = load_ds_json(cfg)
        run = start_run(cfg, lambda world: tp.check_parallel_setup(
            cfg.parallel.tensor, world, zero_stage(ds_base), f"deepspeed.config {cfg.deepspeed.config}",
            "use a ZeRO-1 or ZeRO-2 config (e.g. ds_configs/zero2.json) or parallel.tensor=1"))
        self.preemption, self.rank, self.world, self.groups = run.preemption, run.rank, run.world, run.groups
        g = self.groups
        self.is_main = run.is_main
        self.run_dir = Path(cfg.run.dir).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        resuming = bool(checkpoint.candidates(self.ckpt_root, cfg.train.resume_from))
        # Before any engine: a changed model shape, tokenizer, data, seq_len or seed is refused in one line.
        changes = config_change.check_resume_config(self.run_dir, cfg.to_dict()) if resuming else []
        dist.barrier()  # checkpoints/ is made by the first save: a launch refused before it leaves none behind

        torch.manual_seed(cfg.train.seed)
        self.dtype, self.device = run.dtype, run.device
        self.data = build_data(cfg)
        self.train_shards = self.data.train
        self.loader: Loader = make_loader(cfg, self.data.components or self.data.train, g, train=True)
        # Per-source ids the objective counts: a mixture's names, or the shards' input files (track_sources).
        self.source_names = getattr(self.loader, "source_names", None)
        if self.source_names is None and cfg.data.track_sources:
            self.source_names = [str(i) for i in range(len(self.train_shards.sources))]
        self.model = build_model(cfg, self.data, g, ds_base, self.dtype)
        self.engine, self.scheduler = self.model.engine, self.model.scheduler
        self.ds_config, self.lm_config, self.summary = self.model.ds_config, self.model.hf_config, self.model.summary
        self.objective, self._clm = Objective.from_config(cfg), Objective("clm")
        self.reference: ReferenceLosses | None = None
        if self.objective.needs_reference:
            if reference is None:
                raise ValueError(f"slm.score {cfg.slm.score} needs a reference: pass reference= "
                                 "(megaslm.launch.build_reference builds the config's)")
            self.reference = reference(self)
        self.guard = SkipGuard(cfg.train.max_skipped_steps, cfg.train.spike_skip_sigma, cfg.train.spike_window)
        self.callbacks: list[Callback] = [MixtureMetrics()] if self.data.components else []
        self.callbacks += [self.guard, *(callbacks or [])]
        if isinstance(self.reference, Callback):  # an EMA reference updates after each step, saved with the run
            self.callbacks.append(self.reference)
        self.callbacks += [FaultInjection(), Validation(), Logging()]
        self.states = StateRegistry()  # what every checkpoint saves besides the engine's own state
        self.states.register("loader", _LoaderState(self))
        self.states.register_callbacks(self.callbacks)

        self.step = 0
        self.data_error, self.data_failed, self._last_batches = None, False, None
        state = checkpoint.resume(self.engine, self.ckpt_root, cfg.train.resume_from, self._say, cfg.to_dict())
        if state is not None:
            self.step = int(state["step"])
            self.states.load_state_dict(state)
            # DeepSpeed restored the saved lr, schedule base, clip and betas: this config's apply from here on.
            config_change.apply_optimizer_settings(self.engine, self.scheduler, cfg.train)
            for change in changes:
                self._say(f"megaslm: {change} from step {self.step + 1}")
        self.resumed_from = state["tag"] if state else None

        self.run_info = run_info(cfg, self.world, g, self.dtype, self.model, self.data, self.reference)
        self.run_info["step_batch_changes"] = self._step_batch_changes(state is not None)
        if checkpoint.agree_fenced():  # taken over while this launch was starting: write nothing
            halt(lost_message(" (while starting)"), self.rank)
        if self.is_main:
            write_run_files(self.run_dir, cfg, self.run_info, self.model)
        self.monitor = Monitor(str(self.run_dir), cfg, self.is_main, self.step,
                               {**cfg.to_dict(), "run_info": self.run_info})
        self.speed = Throughput(cfg, self.summary, self.world, g.dp_size, self.reference)

    def _step_batch_changes(self, resumed: bool) -> list[dict]:
        """run_info's record of the steps at which the optimizer step's batch changed (earlier launches' too);
        a change made by this resume is said in one line."""
        before = []
        info = run_files.run_info(self.run_dir) if resumed else None
        if info:
            before = [c for c in info.get("step_batch_changes", []) if c["step"] <= self.step]
        change = self.loader.step_batch_change if resumed else None
        if change:
            self._say(f"megaslm: the optimizer step's batch changes from {change[0]} to {change[1]} sequences "
                      f"(micro_batch_size x data-parallel ranks x grad_accum) from step {self.step + 1}; the data "
                      f"order goes on from the same sequence")
            before.append({"step": self.step + 1, "from": change[0], "to": change[1]})
        return before

    # ------------------------------------------------------------------ one optimizer step
    def _objective_now(self) -> tuple[Objective, float]:
        """(objective, ratio) of the step about to be taken: CLM before slm.start_step, then the ratio schedule."""
        if self.cfg.objective != "slm":
            return self._clm, 1.0
        s = self.cfg.slm
        ratio = slm_ratio(s.ratio, self.step, s.start_step, s.ratio_warmup_steps)
        return (self._clm, 1.0) if ratio is None else (self.objective, ratio)

    def _micro_step(self, batch: dict, objective: Objective, ratio: float, norm, last: bool = False) -> Metrics:
        input_ids = batch["input_ids"].to(self.device)
        labels = batch["labels"].to(self.device)
        extra = model_inputs(batch, self.device)
        # head_outputs: e.g. the entropy, from the same online softmax as the loss. CLM (and SLM before
        # slm.start_step) backpropagates a scalar times the labelled tokens' losses, known before the forward: the
        # loss head then forms its gradients in the forward (3 head matmuls, no recompute).
        out = self.engine(input_ids, labels, **extra, head_outputs=objective.head_outputs,
                          fused=objective.kind == "clm")
        tensors = {"token_loss": out[0], **out[1]} if isinstance(out, tuple) else {"token_loss": out}
        for cb in self.callbacks:
            cb.on_forward(self, tensors)
        token_loss = tensors.pop("token_loss")
        if self.data_error:  # this rank has no batch for the step: a NaN loss skips the step on every rank
            token_loss = token_loss * float("nan")
        ref_loss = None
        if objective.needs_reference:
            ref_loss = self.reference.losses_for({"input_ids": input_ids, "labels": labels, "index": batch["index"],
                                                  **extra})
        source = batch.get("source")
        # A NaN score (no top k) makes the loss NaN on every rank at once; the skip guard then drops the step.
        loss, stats = objective(
            token_loss, labels != -100, ratio=ratio, ref_loss=ref_loss, head=tensors,
            dp_group=self.groups.dp_group, step=norm, source=source.to(self.device) if source is not None else None,
            num_sources=len(self.source_names) if source is not None else 0,
            # The stop check rides on the last micro-step's metrics all-reduce (no collective of its own).
            stop_requested=self._stop_flag() if last else None)
        for cb in self.callbacks:
            cb.pre_optimizer(self, stats)  # the skip guard: before the boundary step(), which applies or skips
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
        batches = self._fetch_batches()
        objective, ratio = self._objective_now()
        norm = None
        if len(batches) > 1:
            norm = objective.plan_step([b["labels"].to(self.device) != -100 for b in batches], ratio,
                                       self.groups.dp_group)
        n = len(batches)
        per_micro = [self._micro_step(b, objective, ratio, norm, last=i == n - 1) for i, b in enumerate(batches)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.time() - t0
        self.step += 1
        Metrics.resolve_all(per_micro)  # sync point: the step's figures, once (the skip guard may have read them)
        rec = dict(Metrics.combine(per_micro))
        if self.cfg.objective == "slm":
            rec["slm_ratio"] = ratio
        # Ranks that asked to stop, all-reduced with the last micro-step's metrics: every rank decides alike.
        flag = rec.pop("stop_requested", 0)
        self.data_failed = flag >= DATA_ERROR  # a rank's shard was cut: the step was skipped; save and stop
        if LEASE_LOST <= flag < DATA_ERROR:  # rank 0 saw the lease taken over: no callback, log or save writes
            halt(lost_message(f" (at step {self.step})"), self.rank)
        self.stop_requested = 0 < flag < LEASE_LOST
        rec["step"] = self.step
        rec["lr"] = self.scheduler.get_last_lr()[0] if self.scheduler else self.cfg.train.lr
        rec["grad_norm"] = self.guard.grad_norm(self.engine)  # read with the metrics, in the guard's one transfer
        self.speed.fill(rec, self.step, dt, self.loader.epoch)
        for cb in self.callbacks:  # ... validation and logging last
            cb.post_step(self, rec)
        return rec

    def _stop_flag(self) -> float:
        """This rank's part of the step's stop flag: 1 for a stop signal, plus LEASE_LOST on rank 0 once the
        heartbeat (or a refused metrics write) found the lease lost (a flag read, no file access). The flag is
        summed over the data-parallel group, which is every rank only without tensor parallelism; with it, the
        ranks learn a lost lease at the next save, and rank 0 writes no metrics meanwhile."""
        lost = not holding() and self.groups.tp_size == 1
        return (float(self.preemption.requested()) + (LEASE_LOST if lost else 0.0)
                + (DATA_ERROR if self.data_error else 0.0))

    def _fetch_batches(self) -> list[dict]:
        """The step's batches. A shard file cut under the run (ShardChanged, instead of SIGBUS) gives the previous
        step's batches again, with the error kept: the step's loss is then NaN on this rank, so the skip guard
        drops it on every rank, and the stop flag tells every rank to save and stop (_data_halt)."""
        try:
            batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        except ShardChanged as e:
            if self._last_batches is None:  # nothing to stand in for them: end here (no checkpoint)
                raise
            self.data_error = str(e)
            return self._last_batches
        self._last_batches = batches
        return batches

    def _data_halt(self) -> None:
        """After the save that follows a cut shard: the rank(s) that read it print the one line; all stop."""
        if self.data_error:
            print(f"error: {self.data_error}. Step {self.step} was skipped on every rank (no update) and a "
                  f"checkpoint saved; restore the file and re-run the same command to resume", file=sys.stderr,
                  flush=True)
        dist.barrier()
        raise RunHalted(self.data_error or "a shard file was cut")

    def save(self) -> None:
        state = {"step": self.step, "objective": self.cfg.objective, **self.states.state_dict()}
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
            self.train_step()  # its callbacks validate and log
            last, stop = self.step == t.steps, self.stop_requested
            if (t.save_every and self.step % t.save_every == 0) or last or stop or self.data_failed:
                self.save()
                saved_at = self.step
            if self.data_failed:
                self._end()
                self._data_halt()
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
