"""One run directory, one live run (megaslm/lease.py) with real `megaslm train` processes: a second launch is
refused while the first trains undisturbed; a stale, a requeued or a forced launch takes over and resumes
exactly; the lease goes away on a normal end, an error and a signal; Ctrl-C saves and the resumed run equals an
uninterrupted one. Also the data checks that run before a run directory exists."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megaslm.lease import LEASE_FILE, read_lease
from tests.conftest import REPO, read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow

STEPS = 8


def config(run_dir, data, **train):
    t = {"steps": STEPS, "seq_len": 32, "micro_batch_size": 2, "save_every": 2, "keep_checkpoints": 10,
         "lr": 2e-3, "warmup_steps": 2, "seed": 3}
    t.update(train)
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": data["train"], "tokenizer": data["tok"]},
            "train": t, "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"}}


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def tags(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megaslm.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(cond, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def steps_logged(run_dir) -> int:
    f = run_dir / "metrics.jsonl"
    return len([x for x in f.read_text().splitlines() if x.endswith("}")]) if f.exists() else 0


def foreign_lease(run_dir, age_s: float, **kw) -> dict:
    """The lease a run on another node would leave: its pid means nothing here; only its heartbeat counts."""
    now = time.time()
    rec = {"host": "node9", "pid": 1, "machine": "another-node", "slurm_job_id": None, "slurm_restart_count": 0,
           "started": now - age_s - 60, "heartbeat": now - age_s, "stale_after_s": 300.0, "token": "f0reign", **kw}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LEASE_FILE).write_text(json.dumps(rec))
    return rec


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("error: ")]


def assert_resumed_exactly(run_dir, plain):
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6), step


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_data):
    """An uninterrupted run; its lease is gone at the normal end."""
    root = tmp_path_factory.mktemp("lease")
    run = root / "plain"
    run_cli("train", str(write_config(root / "plain.yaml", config(run, tiny_data))), check=True)
    assert not (run / LEASE_FILE).exists()
    return run, losses(run)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_data):
    """A run that died of an error after step 5 (checkpoint at 4): the error released its lease."""
    root = tmp_path_factory.mktemp("lease_crash")
    run = root / "crashed"
    res = run_cli("train", str(write_config(root / "c.yaml", config(run, tiny_data))),
                  env={"MEGASLM_FAULT": "crash_after_step:5"})
    assert res.returncode != 0 and "injected fault crash_after_step" in res.stderr
    assert not (run / LEASE_FILE).exists()
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000004"
    return run


def test_second_live_launch_is_refused_and_the_first_run_is_undisturbed(tmp_path, tiny_data, plain):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", config(run, tiny_data))
    first = start("train", str(cfg))
    try:
        wait_for(lambda: steps_logged(run) >= 1, first, "step 1")
        first.send_signal(signal.SIGSTOP)  # frozen mid-run: certainly live while the second launch looks
        held = json.loads((run / LEASE_FILE).read_text())
        t0 = time.monotonic()
        res = run_cli("train", str(cfg))
        elapsed = time.monotonic() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert res.returncode == 2 and elapsed < 10, (res.returncode, elapsed)
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    print(lines[0])
    assert lines[0].startswith(f"error: run directory {run} is in use by a live run: pid {first.pid} on host "
                               f"{held['host']}, started {held['started_utc']}, heartbeat ")
    assert f"(lease {run / LEASE_FILE})" in lines[0] and "--force" in lines[0]
    assert res.stdout == ""  # no engine, no progress line: it stopped before building anything
    # The first run's history and checkpoints are those of the undisturbed run.
    assert_resumed_exactly(run, plain[1])
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert tags(run) == tags(plain[0])
    assert not (run / LEASE_FILE).exists()


def test_a_refusal_ends_every_rank(tmp_path, tiny_data):
    """Two ranks under torchrun: rank 0 refuses, rank 1 learns it over the process group and exits too."""
    run = tmp_path / "run"
    foreign_lease(run, age_s=3)
    t0 = time.monotonic()
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", config(run, tiny_data))), nproc=2, timeout=120)
    assert res.returncode != 0 and time.monotonic() - t0 < 60
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "in use by a live run: pid 1 on host node9, started" in lines[0], res.stderr
    assert sorted(os.listdir(run)) == [LEASE_FILE]  # nothing written
    assert json.loads((run / LEASE_FILE).read_text())["token"] == "f0reign"


def test_stale_lease_is_taken_over_and_the_run_resumes_exactly(tmp_path, crashed, tiny_data, plain):
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    foreign_lease(run, age_s=400)
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", config(run, tiny_data))), check=True)
    took = [x for x in res.stdout.splitlines() if "took over the lease" in x]
    print(took[0])
    assert len(took) == 1 and took[0].startswith(f"megaslm: took over the lease on run directory {run} from pid 1 "
                                                 f"on host node9, started ")
    age = re.search(r"heartbeat (\d+) s ago: its heartbeat is \1 s old \(stale after 300 s\)$", took[0])
    assert age and 400 <= int(age.group(1)) < 500, took[0]
    assert "resumed from step_00000004" in res.stdout
    assert_resumed_exactly(run, plain[1])
    assert not (run / LEASE_FILE).exists()


def test_requeued_job_takes_over_its_own_lease(tmp_path, crashed, tiny_data, plain):
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    foreign_lease(run, age_s=3, slurm_job_id="77")  # fresh: the instance before the requeue looks alive
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data)))
    res = run_cli("train", cfg, env={"SLURM_JOB_ID": "78"})  # another job is refused
    assert res.returncode == 2 and "(Slurm job 77), started" in error_lines(res.stderr)[0]
    res = run_cli("train", cfg, env={"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, check=True)
    took = [x for x in res.stdout.splitlines() if "took over the lease" in x]
    print(took[0])
    assert len(took) == 1 and "from pid 1 on host node9 (Slurm job 77)" in took[0]
    assert took[0].endswith("Slurm job 77 was restarted (restart 1; the lease is from restart 0)")
    assert "resumed from step_00000004" in res.stdout
    assert_resumed_exactly(run, plain[1])
    assert not (run / LEASE_FILE).exists()


def test_force_takes_over_a_live_lease(tmp_path, tiny_data, plain):
    run = tmp_path / "run"
    shutil.copytree(plain[0], run)
    foreign_lease(run, age_s=3)
    # export reads only: no lease, a warning, and the export all the same.
    res = run_cli("export", str(run), "--out", str(tmp_path / "hf"), check=True)
    warn = [x for x in res.stderr.splitlines() if x.startswith("megaslm: warning:")]
    print(warn[0])
    assert len(warn) == 1 and warn[0].startswith(f"megaslm: warning: {run} is held by a live run (pid 1 on host "
                                                 f"node9, started ")
    assert warn[0].endswith("exporting its newest complete checkpoint as of now (the run may write newer ones)")
    assert (tmp_path / "hf" / "config.json").is_file()
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", config(run, tiny_data))), "--force", check=True)
    took = [x for x in res.stdout.splitlines() if "took over the lease" in x]
    print(took[0])
    assert len(took) == 1 and re.search(r"heartbeat \d+ s ago: forced \(--force / run.take_over\)$", took[0])
    assert f"resumed from step_{STEPS:08d}: step {STEPS}/{STEPS}" in res.stdout
    assert not (run / LEASE_FILE).exists()


def test_ctrl_c_saves_releases_the_lease_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, tiny_data,
                                                                                          plain):
    run = tmp_path / "run"
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data, save_every=0)))  # only the Ctrl-C saves
    proc = start("train", cfg)
    wait_for(lambda: steps_logged(run) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [x for x in out.splitlines() if x.startswith("megaslm:")]
    print("\n".join(lines))
    assert "megaslm: Ctrl-C: finishing this step, then saving a checkpoint and exiting (Ctrl-C again exits at " \
           "once, without saving)" in lines
    saved = [x for x in lines if "stop signal received: checkpoint saved at step" in x]
    n = int(saved[0].rsplit(" ", 1)[1])
    assert 2 <= n < STEPS, out
    assert tags(run) == [f"step_{n:08d}"] and steps_logged(run) == n
    assert (run / "checkpoints" / "latest_complete").read_text() == f"step_{n:08d}"
    assert "megaslm: checkpoint saved; not requeueing: stopped by Ctrl-C (SIGINT)" in lines
    assert not (run / LEASE_FILE).exists()  # released on the signal
    res = run_cli("train", cfg, check=True)
    assert f"resumed from step_{n:08d}" in res.stdout
    assert_resumed_exactly(run, plain[1])


def test_ctrl_c_on_one_of_two_ranks_stops_both_at_that_step(tmp_path, tiny_data, plain):
    """Rank 0 gets SIGINT during step 3 (fault injection): both ranks finish step 3, save it and stop; the resumed
    two-rank run equals the uninterrupted one-rank run (data-parallel exactness)."""
    run = tmp_path / "run"
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data, save_every=0, micro_batch_size=1)))
    res = run_cli("train", cfg, nproc=2, env={"MEGASLM_FAULT": "sigint_in_step:3"})
    assert res.returncode != 0 and "exitcode  : 130" in res.stderr, res.stderr[-3000:]  # torchrun's report of rank 0
    assert "megaslm: Ctrl-C: finishing this step" in res.stdout
    assert "stop signal received: checkpoint saved at step 3" in res.stdout
    assert tags(run) == ["step_00000003"] and steps_logged(run) == 3
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000003").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (run / LEASE_FILE).exists()
    run_cli("train", cfg, nproc=2, check=True)
    assert_resumed_exactly(run, plain[1])


def test_ctrl_c_on_megaslms_launcher_saves_and_ends_in_one_line(tmp_path, tiny_data):
    """A terminal's Ctrl-C reaches the launcher (the ranks run in sessions of their own): torchrun's agent passes it
    on and raised SignalException with a traceback; megaslm.parallel.launch ends in one line, exit 130."""
    from megaslm.parallel.dist import free_port

    run = tmp_path / "run"
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data, save_every=0, steps=200)))
    proc = subprocess.Popen([sys.executable, "-m", "megaslm.parallel.launch", "--nproc_per_node=2",
                             f"--master_port={free_port()}", "-m", "megaslm.cli", "train", cfg], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: steps_logged(run) >= 2, proc, "step 2")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert "death signal" not in err, err[-3000:]  # torchrun's agent's own warning
    assert err.strip().splitlines()[-1] == ("megaslm: stopped by SIGINT: passed to the ranks, which save a checkpoint "
                                            "at the end of their step and stop (run the same command again to resume)")
    saved = re.findall(r"stop signal received: checkpoint saved at step (\d+)", out)
    assert saved and tags(run) == [f"step_{int(saved[0]):08d}"], out[-3000:]


# ---------------------------------------------------------------------------------------------- before a run dir
def test_wrong_kind_of_path_names_the_key_and_the_file_and_creates_no_run_dir(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = config(run, tiny_data)
    cfg["data"]["train"] = tiny_data["train_text"]  # a file, not a shard directory
    path = write_config(tmp_path / "c.yaml", cfg)
    res = run_cli("train", str(path))
    lines = error_lines(res.stderr)
    print(lines[0])
    size = os.path.getsize(tiny_data["train_text"])
    assert res.returncode == 2 and lines == [
        f"error: data.train {tiny_data['train_text']} is a file ({size} bytes), expected a shard directory written "
        f"by `megaslm prepare` (data.train in {path})"]
    assert not run.exists()

    cfg["data"]["train"] = tiny_data["train"]
    cfg["data"]["valid"] = {"held_out": tiny_data["valid_other"]}  # shards of another tokenizer
    path = write_config(tmp_path / "c.yaml", cfg)
    res = run_cli("train", str(path))
    lines = error_lines(res.stderr)
    print(lines[0])
    assert res.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: data.valid.held_out {tiny_data['valid_other']} was tokenized with "
                               f"vocab_size 600 but data.train {tiny_data['train']} has vocab_size 512: every "
                               f"shard set of a run must share one tokenizer (data.valid.held_out in {path})")
    assert not run.exists()


def test_a_config_refused_after_the_lease_leaves_no_run_dir(tmp_path, tiny_data):
    """check_config runs after the lease is taken (so that a second launch is refused in a second): a config it
    refuses leaves neither a lease nor the run directory the lease made."""
    run = tmp_path / "run"
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", config(run, tiny_data))),
                  "--set", "train.seq_len=100000")
    lines = error_lines(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "exceeds the max_position_embeddings" in lines[0], res.stderr
    assert not run.exists()


def test_score_takes_a_lease_on_its_cache(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    lease = tmp_path / "cache.lease.json"
    foreign_lease(tmp_path, age_s=3)
    (tmp_path / LEASE_FILE).rename(lease)
    cfg = write_config(tmp_path / "s.yaml", {
        "run": {"dir": str(tmp_path / "run")}, "data": {"train": tiny_data["valid"]}, "objective": "slm",
        "train": {"seq_len": 32}, "wandb": {"mode": "disabled"},
        "reference": {"path": str(tmp_path / "ref"), "cache": str(cache)}})
    res = run_cli("score", str(cfg))
    lines = error_lines(res.stderr)
    print(lines[0])
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"error: reference.cache {cache} is in use by a live run: pid 1 on host node9")
    assert "take over with --set run.take_over=true if" in lines[0]  # score's own --force means score again
    assert not cache.exists() and json.loads(lease.read_text())["token"] == "f0reign"


def stopped(proc) -> bool:
    """The process is stopped (SIGSTOP has taken effect: state T in /proc)."""
    stat = open(f"/proc/{proc.pid}/stat").read()
    return stat[stat.rindex(")") + 2] in "Tt"


def test_a_launch_that_lost_its_lease_writes_nothing_more_and_names_the_new_holder(tmp_path, tiny_data, plain):
    """The SIGSTOP takeover: the holder is frozen (a stopped VM, a hung mount), a second launch takes the lease
    over (--force stands for the stale bound), the holder is continued while the second launch holds the lease.
    The old launch stops within a step, writes nothing more and names the new holder; the run directory's
    checkpoints, latest_complete, metrics.jsonl and config.yaml are all the new launch's."""
    run = tmp_path / "run"
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data)))
    old = start("train", cfg)
    new = None
    try:
        wait_for(lambda: steps_logged(run) >= 3, old, "step 3")
        old.send_signal(signal.SIGSTOP)
        wait_for(lambda: stopped(old), old, "the old launch to stop")
        rows_at_stop = steps_logged(run)
        old_token = json.loads((run / LEASE_FILE).read_text())["token"]
        new = start("train", cfg, "--force", "--set", "run.name=second")
        wait_for(lambda: (read_lease(run / LEASE_FILE) or {}).get("token") not in (None, old_token)
                 and "second" in (run / "config.yaml").read_text(), new, "the takeover")
        new.send_signal(signal.SIGSTOP)  # the new launch holds the lease while the old one goes on
        wait_for(lambda: stopped(new), new, "the new launch to stop")
        old.send_signal(signal.SIGCONT)
        out, err = old.communicate(timeout=300)
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
    new_out, new_err = new.communicate(timeout=300)
    assert new.returncode == 0, new_err[-3000:]
    lines = error_lines(err)
    print(lines)
    assert old.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: this launch lost the lease on run directory {run} (")
    assert f"it was taken over by pid {new.pid} on host " in lines[0]
    logged = [int(m) for m in re.findall(r"^step (\d+)/", out, re.M)]
    assert max(logged) == rows_at_stop  # not one console line (nor metrics row) after the takeover
    # The run directory is the new launch's: one row per step with the uninterrupted run's losses, its config,
    # and every checkpoint after its resume point committed by it.
    assert [r["step"] for r in read_metrics(run)] == list(range(1, STEPS + 1))
    assert_resumed_exactly(run, plain[1])
    assert "name: second" in (run / "config.yaml").read_text()
    resumed = int(re.search(r"resumed from step_(\d+)", new_out).group(1))
    assert (run / "checkpoints" / "latest_complete").read_text() == f"step_{STEPS:08d}"
    for tag in tags(run):
        writer = json.loads((run / "checkpoints" / tag / "manifest.json").read_text())["written_by"]["pid"]
        assert writer == (new.pid if int(tag[5:]) > resumed else old.pid), tag
    assert not (run / LEASE_FILE).exists()


def test_a_resume_applies_a_changed_lr_and_refuses_a_changed_seq_len(tmp_path, crashed, tiny_data, plain):
    """DeepSpeed restores the saved lr, schedule base and clip with the optimizer state: the new config's apply
    from the resumed step, each said in one line; a key that fixes what the checkpoints mean is refused."""
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    cfg = str(write_config(tmp_path / "c.yaml", config(run, tiny_data)))
    res = run_cli("train", cfg, "--set", "train.seq_len=16")
    lines = error_lines(res.stderr)
    print(lines)
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"error: cannot resume {run} under another train.seq_len: train.seq_len 32 -> 16")
    assert "train.resume_from=none" in lines[0]
    res = run_cli("train", cfg, "--set", "train.lr=6e-3", "--set", "train.grad_clip=0.3", check=True)
    said = [x for x in res.stdout.splitlines() if " -> " in x]
    print(said)
    assert said == ["megaslm: train.grad_clip 1.0 -> 0.3 from step 5", "megaslm: train.lr 0.002 -> 0.006 from step 5"]
    recs = {r["step"]: r for r in read_metrics(run)}
    before = {r["step"]: r for r in read_metrics(plain[0])}
    for step in (1, 4, 5):  # the weights of step 5's forward are step 4's: same loss; the lr is the new one
        assert recs[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5)
    for step in (5, 6, 8):
        assert recs[step]["lr"] == pytest.approx(3 * before[step]["lr"], rel=1e-9)
    assert abs(recs[6]["loss"] - before[6]["loss"]) > 1e-3  # trained with the new rate


def test_a_shard_cut_under_the_run_stops_it_with_a_checkpoint_and_one_line(tmp_path, tiny_data):
    """Token files cut in place while the run reads them (MEGASLM_FAULT=shrink_shard): no SIGBUS; the step is
    skipped, a checkpoint saved, the lease released, one line names the file, exit 2."""
    shards = tmp_path / "train"
    shutil.copytree(tiny_data["train"], shards)
    run = tmp_path / "run"
    data = {**tiny_data, "train": str(shards)}
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", config(run, data))),
                  env={"MEGASLM_FAULT": "shrink_shard:3"})
    lines = error_lines(res.stderr)
    print(lines)
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert re.match(rf"error: shard file {shards}/tokens_\d+\.bin shrank to 0 bytes while this run read it", lines[0])
    assert lines[0].endswith("Step 3 was skipped on every rank (no update) and a checkpoint saved; restore the file "
                             "and re-run the same command to resume")
    assert "step 3 skipped (no optimizer update)" in res.stdout
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000003"
    assert not (run / LEASE_FILE).exists()
