"""Fault injection for tests: MEGASLM_FAULT=<point>:<step> makes the process die at that point.

Points: `crash_after_step` (an unhandled error once that optimizer step has run, before it is logged or saved) and
`crash_in_save` (after DeepSpeed wrote that step's files, before the checkpoint is committed), and
`crash_in_score` (`megaslm score`: after that chunk's file is written). The tests use it
to prove that a crash never corrupts the last good checkpoint and that resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    pass


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get("MEGASLM_FAULT")
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and at.isdigit() and int(at) == step:
        raise InjectedFault(f"injected fault {point} at step {step} (MEGASLM_FAULT)")
