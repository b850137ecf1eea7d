"""Metrics sinks, rank 0 only: console lines, RUN_DIR/metrics.jsonl, and wandb.

Every logged step also gets `elapsed_s` (since this process started training) and `eta_s` (the steps left at
the pace of the recent ones, see Progress), and its console line ends with `elapsed HH:MM:SS | eta HH:MM:SS`.

A resumed run (after preemption or a crash) keeps one history: metrics.jsonl drops records past the step it
resumed from, and wandb continues the same run through the id stored in RUN_DIR/wandb_id.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections import deque
from pathlib import Path

from megaslm import run_files

# Dense bf16 peak TFLOP/s per device, for the MFU estimate (override with train.peak_tflops).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "V100": 125.0}


def device_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token (megaslm/model/describe.py): 6N plus 12*L*H*T for attention scores."""
    from megaslm.model.describe import train_flops_per_token

    return train_flops_per_token(n_params, n_layers, hidden, seq_len)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def hms(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Elapsed time and the time left, from the pace of the last `window` steps (or units of work).

    The window spans whole evaluation/checkpoint periods where the caller sizes it so (Monitor: the largest of
    eval_every, save_every and 4 log intervals), so their cost is in the pace without one of them swinging it.
    Recent rather than overall pace: the first steps are slow (warm-up, allocator, caches) and a resumed run's
    earlier attempt is not this process's speed."""

    def __init__(self, total: int, start: int = 0, window: int = 20, clock=time.monotonic):
        self.total, self.window, self.clock = total, max(1, window), clock
        self.t0 = clock()
        self.marks: deque[tuple[float, int]] = deque([(self.t0, start)])

    def update(self, done: int) -> tuple[float, float]:
        """(elapsed seconds, estimated seconds left) once `done` of `total` are done."""
        now = self.clock()
        self.marks.append((now, done))
        while len(self.marks) > 2 and done - self.marks[1][1] >= self.window:
            self.marks.popleft()
        (t_a, a), (t_b, b) = self.marks[0], self.marks[-1]
        pace = (t_b - t_a) / (b - a) if b > a else 0.0
        return now - self.t0, pace * max(0, self.total - done)

    def text(self, done: int) -> str:
        elapsed, left = self.update(done)
        return f"elapsed {hms(elapsed)} | eta {hms(left)}"


class Monitor:
    def __init__(self, run_dir: str, cfg, enabled: bool, resume_step: int, run_config: dict):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / run_files.METRICS
        self.wandb = None
        self.t0 = time.time()
        if not enabled:
            return
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)
        mode = os.environ.get("WANDB_MODE") or cfg.wandb.mode
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id"
            if id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                                    name=cfg.wandb.name or cfg.run.name or self.run_dir.name,
                                    group=cfg.wandb.group, tags=cfg.wandb.tags or None, id=run_id, resume="allow",
                                    mode=mode, dir=str(self.run_dir), config=run_config)
        t = cfg.train  # the clock starts once wandb is up: training starts next
        self.progress = Progress(t.steps, resume_step, window=max(t.eval_every or 0, t.save_every or 0,
                                                                  4 * (t.log_every or 1)))

    def _truncate_after(self, step: int) -> None:
        """Keep one line per step: drop records a crashed or preempted attempt wrote after its last checkpoint.
        When the records kept are the file's beginning (as always but after a line cut mid-file), the file is cut
        in place, so that it stays the one file every launch appends to (a launch that lost its lease is fenced
        and appends nothing); otherwise it is rewritten."""
        if not self.path.exists():
            return
        keep, prefix_bytes, in_prefix = [], 0, True
        for raw in self.path.read_bytes().splitlines(keepends=True):
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None  # a line cut by a crash
            if isinstance(rec, dict) and rec.get("step", 0) <= step and raw.endswith(b"\n"):
                keep.append(raw)
                prefix_bytes += len(raw) if in_prefix else 0
            else:
                in_prefix = False
        if sum(map(len, keep)) == prefix_bytes:
            os.truncate(self.path, prefix_bytes)
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(b"".join(keep))
        tmp.replace(self.path)

    def log(self, record: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        from megaslm.lease import still_holding

        if not still_holding():  # taken over: the directory is another launch's (the loop stops at the next step)
            return
        record = {k: _clean(v) for k, v in record.items()}
        if "step" in record:
            record["elapsed_s"], record["eta_s"] = self.progress.update(record["step"])
            if console:
                console += f" | elapsed {hms(record['elapsed_s'])} | eta {hms(record['eta_s'])}"
        self._file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            step = record.get("step")
            self._wandb_call(lambda: self.wandb.log({k: v for k, v in record.items()
                                                     if k != "step" and v is not None}, step=step))
        if console:
            print(console, file=sys.stdout, flush=True)

    def _wandb_call(self, fn) -> None:
        """wandb must never take the run down: Slurm's SIGTERM also reaches wandb's service process, and the
        next call then fails while the trainer still has a checkpoint to write. Log it once, go on without."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any wandb failure is reported and survived
            print(f"megaslm: wandb failed ({type(e).__name__}: {e}); continuing without it "
                  f"(metrics.jsonl is complete)", file=sys.stderr, flush=True)
            self.wandb = None

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb is not None:
            self._wandb_call(self.wandb.finish)
            self.wandb = None
