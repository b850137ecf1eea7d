"""Preemption: stop at a step boundary on a signal, checkpoint, and let Slurm requeue the job.

Slurm warns a job before its time limit with `--signal=USR1@SECONDS` (our batch scripts ask for it) and
preemption with a grace time sends SIGTERM. The handlers here only record the signal; the training loop polls
`requested()` after every optimizer step, all-reduces it so that every rank stops at the same step, saves a
checkpoint and exits with `after_checkpoint()`'s code. Rank 0 then runs `scontrol requeue $SLURM_JOB_ID`: the
job goes back to the queue (same job id, SLURM_RESTART_COUNT + 1) and its new instance resumes from that
checkpoint. MEGASLM_MAX_REQUEUES (default 3, written by `megaslm submit --max-requeues`) caps the requeues.

Ctrl-C (SIGINT) stops the same way, announced on the console, but is never requeued: the user asked to stop. A
second Ctrl-C exits at once: the first one puts back the kernel's default action, which ends the process even
inside a blocking collective, where a Python handler would only run once the call returns.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

DEFAULT_MAX_REQUEUES = 3


class Preemption:
    """Records stop signals; decides, after the checkpoint, whether to requeue and what to exit with."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            # Only the main thread may install handlers; a trainer built elsewhere just never sees a signal.
            try:
                self._previous[s] = signal.signal(s, self._record)
            except ValueError:
                pass

    def _record(self, signum: int, frame) -> None:  # between two bytecodes of the main thread: keep it tiny
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process at once
            if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per rank
                # os.write, not print: the handler may run inside a print to the same stream.
                os.write(1, b"\nmegaslm: Ctrl-C: finishing this step, then saving a checkpoint and exiting "
                            b"(Ctrl-C again exits at once, without saving)\n")

    def requested(self) -> bool:
        """True once a stop signal arrived in this process."""
        return self.signum is not None

    def restore(self) -> None:
        """Put back the handlers that were installed before this object (for tests and long-lived processes)."""
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def after_checkpoint(self, is_rank0: bool) -> int:
        """Call on every rank once the stop checkpoint is saved. Rank 0 requeues the Slurm job when allowed.

        Returns the exit code. Rank 0: 0 when the job was requeued (its next instance resumes), otherwise
        128 + the signal number, the conventional "stopped by signal" status (not under Slurm, requeue limit
        reached, or the requeue failed), so that a wrapper can tell a clean stop from a finished run. Other
        ranks: 0 always; rank 0 reports the outcome. (A non-zero exit of another rank would make
        `srun --kill-on-bad-exit` kill rank 0 while it is still closing its logs.)
        """
        _barrier()  # every rank's shard is on disk before rank 0 has Slurm kill the job
        if not is_rank0:
            return 0
        stopped = 128 + (self.signum or signal.SIGTERM)
        requeue, why = requeue_decision(os.environ)
        if self.signum == signal.SIGINT:
            requeue, why = False, "stopped by Ctrl-C (SIGINT)"
        if not requeue:
            print(f"megaslm: checkpoint saved; not requeueing: {why}", flush=True)
            return stopped
        job = os.environ["SLURM_JOB_ID"]
        try:
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            print(f"megaslm: `scontrol requeue {job}` failed: {e}", file=sys.stderr, flush=True)
            return stopped
        if res.returncode != 0:
            # e.g. Slurm is already requeueing the job itself (preemption with PreemptMode=REQUEUE).
            print(f"megaslm: `scontrol requeue {job}` failed (rc {res.returncode}): {res.stderr.strip()}",
                  file=sys.stderr, flush=True)
            return stopped
        print(f"megaslm: checkpoint saved; requeued Slurm job {job} ({why})", flush=True)
        return 0


def requeue_decision(env: os._Environ | dict) -> tuple[bool, str]:
    """(requeue?, reason) from the job's environment: only under Slurm, and fewer restarts than the cap."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False, "not running under Slurm (SLURM_JOB_ID unset)"
    try:
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
        cap = int(env.get("MEGASLM_MAX_REQUEUES") or DEFAULT_MAX_REQUEUES)
    except ValueError:
        return False, "SLURM_RESTART_COUNT or MEGASLM_MAX_REQUEUES is not an integer"
    if restarts >= cap:
        return False, f"job {job} was already requeued {restarts} times (MEGASLM_MAX_REQUEUES={cap})"
    return True, f"restart {restarts + 1} of at most {cap}"


def _barrier() -> None:
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
