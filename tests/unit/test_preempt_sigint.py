"""Ctrl-C (SIGINT) in megaslm/preempt.py: the first one is recorded like SIGTERM, never requeued; the
second one gets the kernel's default action (the process ends at once)."""

from __future__ import annotations

import os
import signal

from megaslm.preempt import Preemption


def test_first_ctrl_c_is_recorded_and_not_requeued_second_exits_at_once(tmp_path, monkeypatch, capfd):
    log = tmp_path / "scontrol.log"
    exe = tmp_path / "scontrol"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    before = signal.getsignal(signal.SIGINT)
    p = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # without the handler: KeyboardInterrupt here
        assert p.requested() and p.signum == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second Ctrl-C ends the process at once
        assert "megaslm: Ctrl-C: finishing this step, then saving a checkpoint and exiting (Ctrl-C again exits " \
               "at once, without saving)" in capfd.readouterr().out
        assert p.after_checkpoint(True) == 128 + signal.SIGINT  # under Slurm, yet the user asked to stop
        assert not log.exists()
        assert "not requeueing: stopped by Ctrl-C (SIGINT)" in capfd.readouterr().out
    finally:
        p.restore()
    assert signal.getsignal(signal.SIGINT) == before
