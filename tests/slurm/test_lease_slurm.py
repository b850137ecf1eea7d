"""The run lease on the real two-node Slurm cluster: one config submitted twice while the first job trains. The
second job fails fast with the one line naming the holder; the first finishes undisturbed."""

from __future__ import annotations

import re

from .test_submit import (_job, _log, _steps_logged, _submit, _wait, _wait_done,  # noqa: F401
                          workdir)


LONG = 300  # steps of the first job


def _seconds(runtime: str) -> int:
    h, m, s = (int(x) for x in runtime.split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


def test_second_submission_of_a_running_config_fails_fast(slurm_cluster, workdir):
    c = slurm_cluster
    run_dir = workdir / "runs" / "twice"
    # Long enough that the first job is still training when the second one starts, however fast this machine
    # is (30 steps could end before Slurm started the second job, which then resumed the finished run).
    steps = ("--set", f"train.steps={LONG}")
    first = _submit(c, workdir, "runs/twice", *steps)
    _wait("step 2 of the first job", lambda: len(_steps_logged(run_dir)) >= 2, c, run_dir, first)
    second = _submit(c, workdir, "runs/twice", *steps)  # the same config, the same run directory
    job = _wait_done(c, run_dir, second)
    log = _log(run_dir, second)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", (job, log)
    errors = [x for x in log.splitlines() if x.startswith("error: ")]
    print(errors[0], f"(job ran {job['RunTime']})")
    assert len(errors) == 1 and "Traceback" not in log, log
    assert re.match(rf"error: run directory {re.escape(str(run_dir))} is in use by a live run: pid \d+ on host \S+ "
                    rf"\(Slurm job {first}\), started .* UTC, heartbeat \d+ s ago", errors[0]), errors[0]
    assert _seconds(job["RunTime"]) <= 30, job  # the line itself comes before any torch import (see docs)
    assert not _steps_logged(run_dir) or _job(c, first)["JobState"] in ("RUNNING", "COMPLETED")

    done = _wait_done(c, run_dir, first)
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", _log(run_dir, first)
    assert _steps_logged(run_dir) == list(range(1, LONG + 1))  # every step once: nobody else wrote the history
    assert not (run_dir / "lease.json").exists()
