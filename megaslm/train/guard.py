"""Skipping bad optimizer steps: a non-finite loss or gradient norm, and (optionally) a loss spike.

A step is skipped, on every rank, when its loss or its gradient norm is not finite on any rank, or when
`train.spike_skip_sigma` is set and its loss exceeds the mean of the last `train.spike_window` step losses by more
than that many standard deviations (the rule of OLMo-core's SkipStepAdamW; judged once the window is half full;
every finite loss enters the window, a skipped one too, so that a lasting change of level stops being a spike).

A skipped step:
- makes no optimizer update: weights, Adam moments and Adam's step count stay exactly as they were;
- consumes its batch (the loader advances) and counts towards `train.steps`;
- advances the learning-rate schedule: the lr stays the function of the step number it is without skips;
- is counted in the metric `skipped_steps` (cumulative) and reported in one line by rank 0.
After `train.max_skipped_steps` consecutive skips the run stops (exit status 2) without saving: the latest
checkpoint, from before the trouble, stays the one to resume from.

How, on DeepSpeed: the decision is taken inside the engine's boundary step(), when ZeRO calls the wrapped torch
optimizer's step(): by then ZeRO has reduced the gradients and computed their global norm (all-reduced over every
rank). To skip, the wrapped step() does nothing; ZeRO then copies the unchanged fp32 master weights back into the
parameters, clears the gradients, steps the lr scheduler and counts the step as usual. Where DeepSpeed itself
finds the gradient norm not finite (DeepSpeed 0.19.8: fp32, bf16 unless `bf16.check_grad_overflow` is false,
any ZeRO-3), it skips the step on its own overflow path, which leaves the lr scheduler where it was: the guard
then steps it, so that both paths advance the schedule alike.

Every rank reaches the same decision without a collective of its own: the loss is all-reduced by the objective
and the gradient norm by ZeRO. The window and the counters are saved in every checkpoint (callback state
`skip_guard`), so a resumed run skips exactly the steps the uninterrupted run skips.
"""

from __future__ import annotations

import functools
import math

import torch

from megaslm.callbacks import Callback
from megaslm.loss.metrics import Metrics
from megaslm.train.halt import halt


class SkipGuard(Callback):
    name = "skip_guard"

    def __init__(self, max_consecutive: int, spike_sigma: float | None = None, window: int = 128):
        self.max_consecutive = max_consecutive
        self.spike_sigma = spike_sigma
        self.window_size = window
        self.window: list[float] = []  # losses of the latest steps, oldest first
        self.skipped = 0  # steps skipped so far in the run
        self.consecutive = 0
        self._micro: list[dict] = []  # the objective's metrics of this step's micro-steps
        self._reason: str | None = None
        self._decided = False
        self._grad_norm: float | None = None  # this step's, read with the metrics when the step was judged

    # -- hooks
    def on_train_start(self, trainer) -> None:
        install_gate(trainer.engine, self._apply)

    def pre_step(self, trainer) -> None:
        self._micro, self._reason, self._decided, self._grad_norm = [], None, False, None

    def pre_optimizer(self, trainer, stats: dict) -> None:
        self.observe(stats)  # before the boundary step(), which applies or skips the update

    def observe(self, stats: dict) -> None:
        """The objective's metrics of one micro-step (identical on every data-parallel rank); a Metrics may still
        hold device tensors: they are read once, when the step is judged."""
        self._micro.append(stats)

    def post_step(self, trainer, rec: dict) -> None:
        skipped = self._decided and self._reason is not None
        if not trainer.engine.was_step_applied():  # DeepSpeed's own overflow path: the scheduler did not move
            trainer.scheduler.step()
            rec["lr"] = trainer.scheduler.get_last_lr()[0]
            skipped, self._reason = True, self._judge(None) or "gradient norm not finite"
        loss = self.step_loss()
        if loss is not None and math.isfinite(loss):
            self.window = (self.window + [loss])[-self.window_size:]
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.skipped += skipped
        rec["skipped_steps"] = self.skipped
        if skipped and trainer.is_main:
            print(f"megaslm: step {trainer.step} skipped (no optimizer update): {self._reason} "
                  f"[{self.consecutive} in a row, {self.skipped} in the run]", flush=True)
        if self.consecutive >= self.max_consecutive:
            from megaslm.train.checkpoint import latest_tag

            last = latest_tag(trainer.ckpt_root)
            halt(f"{self.consecutive} consecutive steps skipped (steps {trainer.step - self.consecutive + 1}-"
                 f"{trainer.step}; last: {self._reason}): stopping (train.max_skipped_steps="
                 f"{self.max_consecutive}). Resume point: {last or 'no checkpoint yet'}. Look at the data of these "
                 f"steps, lower train.lr, or raise train.max_skipped_steps", trainer.rank)

    # -- the decision
    def grad_norm(self, engine) -> float | None:
        """The step's global gradient norm on the host: the value the guard judged (no transfer of its own), else
        the engine's (DeepSpeed's overflow path sets a host inf; a gradient norm it does not compute is None)."""
        if self._decided:
            return self._grad_norm
        gn = engine.get_global_grad_norm()
        return float(gn) if gn is not None else None

    def step_loss(self) -> float | None:
        """Token-weighted mean loss of the step's micro-steps (None if none had tokens to average)."""
        Metrics.resolve_all(self._micro)  # one host transfer for all micro-steps of the step (none if done)
        micro = [(st.get("loss"), float(st.get("n_selected", st.get("n_valid", 1.0)))) for st in self._micro]
        parts = [(loss, n) for loss, n in micro if loss is not None and n > 0]
        total = sum(n for _, n in parts)
        return sum(loss * n for loss, n in parts) / total if total else None

    def _apply(self, grad_norm) -> bool:
        """Called by the gated optimizer step (once per parameter group) with ZeRO's global gradient norm (a device
        tensor, a float or None): apply the update? Judged once per step, the norm and the step's metrics coming
        to the host in one transfer: the step's one host sync of megaslm's own."""
        if not self._decided:
            if isinstance(grad_norm, torch.Tensor):
                (grad_norm,) = Metrics.resolve_all(self._micro, [grad_norm])
            self._grad_norm = None if grad_norm is None else float(grad_norm)
            self._reason, self._decided = self._judge(self._grad_norm), True
        return self._reason is None

    def _judge(self, grad_norm: float | None) -> str | None:
        loss = self.step_loss()
        if loss is not None and not math.isfinite(loss):
            return f"loss is {loss}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if self.spike_sigma is None or loss is None or len(self.window) < max(2, self.window_size // 2):
            return None
        mean = sum(self.window) / len(self.window)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / (len(self.window) - 1))
        if loss - mean > self.spike_sigma * std:
            return (f"loss spike: {loss:.4f} is {(loss - mean) / std if std else math.inf:.1f} standard deviations "
                    f"above the mean {mean:.4f} of the last {len(self.window)} steps "
                    f"(train.spike_skip_sigma={self.spike_sigma:g})")
        return None

    # -- state in checkpoints
    def state_dict(self) -> dict:
        return {"window": list(self.window), "skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.window = [float(x) for x in state["window"]][-self.window_size:]
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])


def install_gate(engine, apply) -> None:
    """Make the torch optimizer(s) inside the engine's ZeRO optimizer step only when apply(grad_norm) is True."""
    outer = engine.optimizer
    inner = [o for o in (getattr(outer, "optimizer", None), getattr(outer, "backup_optimizer", None)) if o is not None]
    for opt in inner or [outer]:
        if getattr(opt.step, "_megaslm_gated", False):
            continue
        original = opt.step

        @functools.wraps(original)  # keeps the attributes torch's lr scheduler put on its own wrapper
        def gated(*args, _original=original, **kwargs):
            norm = getattr(outer, "_global_grad_norm", None)  # ZeRO's all-reduced norm of this step (on the device)
            return _original(*args, **kwargs) if apply(norm) else None

        gated._megaslm_gated = True
        opt.step = gated
