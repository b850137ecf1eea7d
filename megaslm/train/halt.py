"""Stopping every rank of a run on purpose (a failed save, too many skipped steps) with one message.

The ranks decide together (from all-reduced values) and raise together. Rank 0's RunHalted carries the message,
which the CLI prints as `error: ...` (exit status 2); the other ranks' are `quiet`: they exit with status 2
without printing, so the user reads the line once.
"""

from __future__ import annotations

from megaslm.errors import UserError


class RunHalted(UserError):
    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def halt(message: str, rank: int) -> None:
    raise RunHalted(message, quiet=rank != 0)
