"""`train.profile_steps: [N, M]`: a torch.profiler trace of optimizer steps N..M on rank 0.

Writes, into RUN_DIR/profile/ (each file whole, via a temporary name):
- `trace_steps_N-M.json` - Chrome trace format: open it in chrome://tracing or https://ui.perfetto.dev; each
  optimizer step is a `megaslm step K` range;
- `top_ops_steps_N-M.txt` - the operators that took the most self time (device time on GPUs, CPU time
  otherwise), also printed on the console: where a step's time goes when MFU is low.
A run that resumes inside N..M profiles the steps it still runs; one that stops early writes what it recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaslm.atomic import write_text
from megaslm.callbacks import Callback

TOP_OPS = 15


class StepProfiler(Callback):
    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.out_dir: Path | None = None
        self.prof = None
        self.started_at = None
        self.step_range = None

    def pre_step(self, trainer) -> None:
        step = trainer.step + 1
        if not trainer.is_main or not self.first <= step <= self.last:
            return
        self.out_dir = trainer.run_dir / "profile"
        if self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
            self.started_at = step
        self.step_range = torch.profiler.record_function(f"megaslm step {step}")
        self.step_range.__enter__()

    def post_step(self, trainer, rec: dict) -> None:
        if self.prof is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        if trainer.step >= self.last:
            self._finish(trainer.step)

    def on_train_end(self, trainer) -> None:
        if self.prof is not None:
            if self.step_range is not None:
                self.step_range.__exit__(None, None, None)
            self._finish(trainer.step)

    def _finish(self, last_step: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        span = f"steps_{self.started_at}-{last_step}"
        trace = self.out_dir / f"trace_{span}.json"
        tmp = trace.with_name(trace.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(trace)
        sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS, max_name_column_width=50)
        head = f"megaslm profile of {span.replace('_', ' ')}: top {TOP_OPS} operators by self time\n"
        write_text(self.out_dir / f"top_ops_{span}.txt", head + table + "\n")
        print(head + table + f"\nmegaslm: profiler trace written to {trace}", flush=True)
