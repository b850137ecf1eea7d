"""Fault injection for tests: MEGASLM_FAULT=<point>:<step>[,<point>:<step>...] injects faults at those points.

Points that make the process die: `crash_after_step` (an unhandled error once that optimizer step has run, before
it is logged or saved), `crash_in_save` (after DeepSpeed wrote that step's files, before the checkpoint is
committed) and `crash_in_score` (`megaslm score`: after that chunk's file is written).
Points that simulate a failure the code must survive:
- `save_enospc` - the save of that step's checkpoint fails with OSError(ENOSPC) on the last rank, after the
  other ranks wrote their files (a disk that fills up during the save);
- `nan_loss` - the per-token losses of that step become NaN on rank 0 (one rank's overflow or a bad batch);
- `spike_loss` - the per-token losses of that step are multiplied by 100 on every rank (a loss spike);
- `shrink_shard` - before that step rank 0 cuts the training shards' token files to 0 bytes in place (a shard
  set rewritten or truncated under a running job);
- `sigint_in_step` - rank 0 sends itself SIGINT during that step, before its stop check (a Ctrl-C that reaches
  one rank while the step runs).
The tests use them to prove that no fault corrupts the last good checkpoint and that resuming reproduces the
uninterrupted run. Several points may be given, separated by commas.
"""

from __future__ import annotations

import errno
import os

import torch

from megaslm.callbacks import Callback


class InjectedFault(RuntimeError):
    pass


def _armed(point: str, step: int) -> bool:
    for item in os.environ.get("MEGASLM_FAULT", "").split(","):
        name, _, at = item.strip().partition(":")
        if name == point and at.isdigit() and int(at) == step:
            return True
    return False


def maybe_fail(point: str, step: int) -> None:
    if _armed(point, step):
        raise InjectedFault(f"injected fault {point} at step {step} (MEGASLM_FAULT)")


def maybe_fail_write(step: int, rank: int, world: int, path: str) -> None:
    """`save_enospc`: the write of `path` fails as on a full disk (on the last rank only)."""
    if rank == world - 1 and _armed("save_enospc", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected: MEGASLM_FAULT)", path)


def corrupt_loss(token_loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """`nan_loss` (rank 0) / `spike_loss` (every rank): the per-token losses of optimizer step `step`."""
    if rank == 0 and _armed("sigint_in_step", step):
        import signal

        os.kill(os.getpid(), signal.SIGINT)
    if rank == 0 and _armed("nan_loss", step):
        return token_loss * float("nan")
    if _armed("spike_loss", step):
        return token_loss * 100.0
    return token_loss


class FaultInjection(Callback):
    """The training loop's fault points as a callback: `nan_loss` / `spike_loss` on the per-token losses of the
    micro-steps, `crash_after_step` once the step's other callbacks ran (before validation, logging and saving),
    `shrink_shard` before the step's batches are read."""

    def pre_step(self, trainer) -> None:
        if trainer.rank == 0 and _armed("shrink_shard", trainer.step + 1):
            shards = trainer.train_shards
            for entry in shards.meta["shards"]:
                os.truncate(os.path.join(shards.path, entry["file"]), 0)

    def on_forward(self, trainer, tensors: dict) -> None:
        tensors["token_loss"] = corrupt_loss(tensors["token_loss"], trainer.step + 1, trainer.rank)

    def post_step(self, trainer, rec: dict) -> None:
        maybe_fail("crash_after_step", trainer.step)
