"""Stopping every rank of a run on purpose (a failed save, too many skipped steps) with one message.

The ranks decide together (from all-reduced values) and call `halt` together: rank 0 prints the message as the
CLI prints any error (`error: ...` on stderr), a barrier makes sure it is out (a launcher such as torchrun or
`srun --kill-on-bad-exit` kills the other ranks as soon as one exits non-zero), then every rank raises RunHalted,
which `megaslm train` turns into exit status 2 without printing it again.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megaslm.errors import UserError


class RunHalted(UserError):
    pass


def halt(message: str, rank: int) -> None:
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    raise RunHalted(message)
