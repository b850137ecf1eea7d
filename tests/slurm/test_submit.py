"""`megaslm submit`, the batch scripts and preemption, on a real two-node Slurm cluster started on this host.

The cluster tests run real (tiny) ZeRO-2 training jobs over gloo: one task on each of two slurmd "nodes".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megaslm import submit
from megaslm.cli import main as cli_main
from megaslm.errors import UserError
from megaslm.preempt import Preemption, requeue_decision

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


def _parse(argv: list[str]):
    from megaslm.cli import build_parser

    return build_parser().parse_args(["submit", *argv])


def _write_config(path: Path, run_dir: str = "runs/x", shards: str = "shards", steps: int = STEPS) -> Path:
    path.write_text(yaml.safe_dump({
        "run": {"dir": run_dir},
        "model": {"preset": "tiny"},
        "data": {"train": shards},
        "train": {"steps": steps, "seq_len": 64, "micro_batch_size": 2, "warmup_steps": 2, "save_every": 0},
        "deepspeed": {"config": str(REPO / "ds_configs" / "zero2.json")},
        "wandb": {"mode": "disabled"},
    }))
    return path


def _sbatch_lines(text: str) -> list[str]:
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------------------------------------- no cluster needed
def test_dry_run_16_nodes_8_gpus(tmp_path, monkeypatch, capsys):
    cfg = _write_config(tmp_path / "cfg.yaml", run_dir="runs/big")
    monkeypatch.chdir(tmp_path)
    args = _parse(["cfg.yaml", "--nodes", "16", "--gpus-per-node", "8", "--partition", "gpu", "--account",
                   "proj42", "--time", "2-00:00:00", "--cpus-per-task", "12", "--set", "train.steps=1000",
                   "--set", "train.lr=1e-4", "--dry-run"])
    assert submit.run(args) == 0
    printed = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "big"
    script = (run_dir / submit.SCRIPT_NAME).read_text()
    assert script in printed  # printed and written: the same text
    lines = _sbatch_lines(script)
    for want in ("--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12", "--requeue",
                 "--partition=gpu", "--account=proj42", "--time=2-00:00:00", f"--chdir={tmp_path}",
                 f"--output={run_dir}/slurm-%j.out", "--open-mode=append",
                 f"--signal=USR1@{submit.DEFAULT_SIGNAL_SECONDS}"):
        assert want in lines, (want, lines)
    assert not any(x.startswith("--signal=B:") for x in lines)  # the tasks, not only the batch shell, get it
    # One srun line launching `megaslm train <absolute config> --set ...` with the overrides in order.
    srun = [line.split() for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and srun[0][:2] == ["srun", "--kill-on-bad-exit=1"] and srun[0][-1] == "&", srun
    cmd = srun[0][2:-1]
    assert Path(cmd[0]).is_absolute() and cmd[0].endswith("megaslm")
    assert cmd[1:] == ["train", str(cfg), "--set", "train.steps=1000", "--set", "train.lr=1e-4"]
    assert "MEGASLM_MAX_REQUEUES=3" in script
    assert "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))" in script
    assert subprocess.run(["bash", "-n", str(run_dir / submit.SCRIPT_NAME)]).returncode == 0


def test_dry_run_cpu_tasks_and_options(tmp_path, monkeypatch, capsys):
    _write_config(tmp_path / "cfg.yaml")
    monkeypatch.chdir(tmp_path)
    args = _parse(["cfg.yaml", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "3", "--max-requeues",
                   "5", "--signal-seconds", "90", "--sbatch-arg=--constraint=fast", "--dry-run"])
    assert submit.run(args) == 0
    script = (tmp_path / "runs" / "x" / submit.SCRIPT_NAME).read_text()
    lines = _sbatch_lines(script)
    assert "--ntasks-per-node=3" in lines and "--nodes=2" in lines
    assert not any(x.startswith("--gpus") for x in lines)
    assert not any(x.startswith(("--partition", "--account", "--time", "--cpus-per-task")) for x in lines)
    assert "--signal=USR1@90" in lines and "--constraint=fast" in lines
    assert "MEGASLM_MAX_REQUEUES=5" in script


@pytest.mark.parametrize("argv, match", [
    (["missing.yaml", "--nodes", "2", "--gpus-per-node", "1"], "missing.yaml"),
    (["cfg.yaml", "--nodes", "0", "--gpus-per-node", "1"], "--nodes must be at least 1, got 0"),
    (["cfg.yaml", "--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node .* got -1"),
    (["cfg.yaml", "--nodes", "1", "--gpus-per-node", "8", "--tasks-per-node", "4"], "--tasks-per-node 4"),
    (["cfg.yaml", "--nodes", "1", "--gpus-per-node", "1", "--set", "train.steps=zero"], "train.steps"),
    (["cfg.yaml", "--nodes", "1", "--gpus-per-node", "1", "--time", "soon"], "--time 'soon'"),
    (["cfg.yaml", "--nodes", "3", "--gpus-per-node", "1", "--set", "parallel.tensor=2"], "parallel.tensor=2"),
    # The USR1 warning must come after the start: 600 s before a 10-minute limit is at once.
    (["cfg.yaml", "--nodes", "1", "--gpus-per-node", "1", "--time", "10:00"], "--signal-seconds 600"),
])
def test_bad_input_is_a_user_error(tmp_path, monkeypatch, argv, match):
    _write_config(tmp_path / "cfg.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        submit.run(_parse([*argv, "--dry-run"]))
    assert not (tmp_path / "runs").exists()  # nothing written for bad input


@pytest.mark.parametrize("first_host, master", [("localhost", "localhost"),
                                                 ("megaslm-node-a.invalid", "10.1.2.3")])
def test_script_rendezvous_and_requeue_cap(tmp_path, monkeypatch, capsys, first_host, master):
    """Run the written script with bash, with fake scontrol/srun: what srun gets, and the requeue cap."""
    _write_config(tmp_path / "cfg.yaml")
    monkeypatch.chdir(tmp_path)
    assert submit.run(_parse(["cfg.yaml", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6",
                              "--max-requeues", "2", "--set", "train.lr=1e-3", "--dry-run"])) == 0
    script = tmp_path / "runs" / "x" / submit.SCRIPT_NAME
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "show hostnames" ]; then printf "{first_host}\\nnode-b\\n"; '
        f'else echo "NodeName={first_host} Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=h"; fi\n')
    (fake / "srun").write_text('#!/bin/sh\necho "srun $*"\n'
                               'echo "env $MASTER_ADDR $MASTER_PORT $MEGASLM_MAX_REQUEUES $OMP_NUM_THREADS '
                               '$SRUN_CPUS_PER_TASK"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "x[1-2]",
           "SLURM_NTASKS": "8", "SLURM_CPUS_PER_TASK": "6"}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "cfg.yaml"
    assert "srun --kill-on-bad-exit=1 /" in res.stdout and f"megaslm train {cfg} --set train.lr=1e-3" in res.stdout
    assert f"env {master} {20000 + 123456 % 20000} 2 6 6" in res.stdout, res.stdout
    # Requeued by Slurm more often than --max-requeues: the job refuses to start.
    res = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "3"}, capture_output=True,
                         text=True)
    assert res.returncode == 1 and "requeued 3 times" in res.stderr and "srun" not in res.stdout


def test_time_limit_seconds():
    assert [submit.time_limit_seconds(x) for x in ("90", "10:30", "4:00:00", "2-00:00:00", "1-2", "1-2:30",
                                                   "UNLIMITED")] == [5400, 630, 14400, 172800, 93600, 95400, None]


def test_sbatch_not_found(tmp_path, monkeypatch, capsys):
    _write_config(tmp_path / "cfg.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="sbatch not found"):
        submit.run(_parse(["cfg.yaml", "--nodes", "1", "--gpus-per-node", "0"]))
    # Through the CLI: one `error:` line and status 2.
    assert cli_main(["submit", "cfg.yaml", "--nodes", "1", "--gpus-per-node", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch not found"), err


def test_slurm_scripts_share_the_launch_code():
    for name in ("pretrain.sbatch", "run.sbatch"):
        path = REPO / "slurm" / name
        text = path.read_text()
        assert submit.PREPARE in text and text.endswith(submit.WAIT), f"{path}: launch code differs from megaslm.submit"
        srun = text[text.index(submit.PREPARE) + len(submit.PREPARE):-len(submit.WAIT)]
        assert srun.startswith(submit.SRUN + ' "${MEGASLM:-megaslm}" ') and srun.endswith('"$@" &\n'), srun
        lines = _sbatch_lines(text)
        for opt in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--cpus-per-task=", "--time=",
                    "--output=", "--requeue", "--signal=USR1@"):
            assert any(x.startswith(opt) for x in lines), (name, opt)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        # Without arguments the script refuses before touching Slurm.
        res = subprocess.run(["bash", str(path)], capture_output=True, text=True)
        assert res.returncode == 2 and "usage:" in res.stderr


def test_requeue_decision():
    assert requeue_decision({})[0] is False
    assert requeue_decision({"SLURM_JOB_ID": "7"}) == (True, "restart 1 of at most 3")
    assert requeue_decision({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "2"})[0] is True
    assert requeue_decision({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"})[0] is False
    assert requeue_decision({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1", "MEGASLM_MAX_REQUEUES": "1"})[0] is False
    assert requeue_decision({"SLURM_JOB_ID": "7", "MEGASLM_MAX_REQUEUES": "0"})[0] is False


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments."""
    log = tmp_path / "scontrol.log"
    exe = tmp_path / "bin" / "scontrol"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "MEGASLM_MAX_REQUEUES"):
        monkeypatch.delenv(k, raising=False)
    return log


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_records_signal_and_requeues(fake_scontrol, monkeypatch, signum):
    p = Preemption()
    try:
        assert not p.requested()
        os.kill(os.getpid(), signum)  # would end the process without the handler
        assert p.requested() and p.signum == signum
        # Not under Slurm: nothing to requeue; "stopped by signal" status from rank 0, 0 from the others.
        assert p.after_checkpoint(True) == 128 + signum
        assert p.after_checkpoint(False) == 0
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        assert p.after_checkpoint(False) == 0  # other ranks never call scontrol
        assert not fake_scontrol.exists()
        assert p.after_checkpoint(True) == 0
        assert fake_scontrol.read_text().split() == ["requeue", "4242"]
        # The cap: restart count 2 with MEGASLM_MAX_REQUEUES=2 stops requeueing.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        monkeypatch.setenv("MEGASLM_MAX_REQUEUES", "2")
        assert p.after_checkpoint(True) == 128 + signum
        assert fake_scontrol.read_text().split() == ["requeue", "4242"]
        # A failing scontrol (e.g. Slurm already requeues the job itself) is reported, not fatal.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        Path(os.environ["PATH"].split(":")[0], "scontrol").write_text("#!/bin/sh\nexit 1\n")
        assert p.after_checkpoint(True) == 128 + signum
    finally:
        p.restore()


# ---------------------------------------------------------------------------------------------- on the cluster
def _sh(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)


def _job(cluster, job_id: str) -> dict:
    res = _sh(["scontrol", "show", "job", "-o", job_id], cluster.env)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def _master(job_id: str) -> str:
    """The rendezvous address the batch scripts guarantee: the first node's name where this host resolves it
    (many cluster hosts list node1 in /etc/hosts), else the address Slurm reaches it at (NodeAddr=127.0.0.1 here);
    the port follows from the job id."""
    try:
        socket.getaddrinfo("node1", None)
        host = "node1"
    except OSError:
        host = "127.0.0.1"
    return f"{host}:{20000 + int(job_id) % 20000}"


def _log(run_dir: Path, job_id: str) -> str:
    f = run_dir / f"slurm-{job_id}.out"
    return f.read_text(errors="replace") if f.exists() else f"(no {f})"


def _wait(what: str, cond, cluster, run_dir: Path, job_id: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; job {job_id}: {_job(cluster, job_id)}\n"
                         f"--- job log\n{_log(run_dir, job_id)[-6000:]}\n--- cluster\n{cluster.logs()}")


def _wait_done(cluster, run_dir: Path, job_id: str) -> dict:
    terminal = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return _wait("the job to end", lambda: (j := _job(cluster, job_id)).get("JobState") in terminal and j,
                 cluster, run_dir, job_id)


def _steps_logged(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip().endswith("}")]


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs}


@pytest.fixture(scope="module")
def workdir(slurm_cluster, tmp_path_factory):
    """Shards from text written here, made with `megaslm tokenizer train` and `megaslm prepare`."""
    import argparse
    import difflib
    import textwrap

    root = tmp_path_factory.mktemp("slurm_work")
    text = "".join(Path(m.__file__).read_text() for m in (argparse, difflib, textwrap))
    (root / "corpus.txt").write_text(text)
    # In this process (through the CLI's own entry point): a new interpreter per command costs seconds here.
    for args in (["tokenizer", "train", "--input", "corpus.txt", "--vocab-size", "512", "--out", "tok"],
                 ["prepare", "--input", "corpus.txt", "--tokenizer", "tok", "--out", "shards"]):
        with _chdir(root):
            assert cli_main(args) == 0
    _write_config(root / "cfg.yaml")
    return root


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _job_env(cluster) -> dict:
    # Jobs inherit the submitter's environment (sbatch --export=ALL). WANDB_MODE wins over the config's
    # wandb.mode; the suite sets it to offline, and SIGTERM to a job step also kills wandb's service process
    # (see docs/slurm.md), so the jobs here run without wandb.
    return {**cluster.env, "WANDB_MODE": "disabled"}


def _submit(cluster, workdir: Path, run_dir: str, *extra: str) -> str:
    res = _sh([sys.executable, "-m", "megaslm.cli", "submit", "cfg.yaml", "--nodes", "2", "--gpus-per-node", "0",
               "--time", "30:00", "--set", f"run.dir={run_dir}", *extra], _job_env(cluster), cwd=workdir)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = res.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), res.stdout
    return job_id


@pytest.mark.parametrize("script, args, ran", [
    ("pretrain.sbatch", ["cfg.yaml", "--set", "train.lr=1e-3"], "train cfg.yaml --set train.lr=1e-3"),
    ("run.sbatch", ["score", "cfg.yaml"], "score cfg.yaml"),
])
def test_hand_written_scripts_on_the_cluster(slurm_cluster, tmp_path, script, args, ran):
    """slurm/*.sbatch as a user submits them, #SBATCH lines overridden on the command line; a stand-in for
    `megaslm` (MEGASLM=...) reports what each task was started with."""
    fake = tmp_path / "megaslm"
    fake.write_text('#!/bin/sh\necho "task $SLURM_PROCID/$SLURM_NTASKS on $SLURMD_NODENAME '
                    'master $MASTER_ADDR:$MASTER_PORT: $*"\n')
    fake.chmod(0o755)
    res = _sh(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
               f"--output={tmp_path}/%j.out", str(REPO / "slurm" / script), *args],
              {**slurm_cluster.env, "MEGASLM": str(fake)}, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    job = _wait_done(slurm_cluster, tmp_path, job_id)
    out = (tmp_path / f"{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", out
    master = _master(job_id)
    for rank, node in ((0, "node1"), (1, "node2")):
        assert f"task {rank}/2 on {node} master {master}: {ran}\n" in out, out


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, workdir):
    """A 2-node x 1-task ZeRO-2 run submitted with `megaslm submit` and left alone."""
    job_id = _submit(slurm_cluster, workdir, "runs/plain")
    run_dir = workdir / "runs" / "plain"
    job = _wait_done(slurm_cluster, run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", _log(run_dir, job_id)
    return run_dir, job_id


def test_two_node_zero2_run(slurm_cluster, workdir, uninterrupted, tmp_path):
    run_dir, job_id = uninterrupted
    log = _log(run_dir, job_id)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["dp_size"] == 2 and info["zero_stage"] == 2
    assert info["backend"] == "gloo"
    assert info["slurm"]["slurm_job_id"] == job_id and info["slurm"]["slurm_nnodes"] == "2"
    assert f"on node[1-2]: 2 tasks, master {_master(job_id)}" in log
    assert _steps_logged(run_dir) == list(range(1, STEPS + 1))
    # ZeRO-2 partitions the optimizer state: one shard per rank proves both ranks took part.
    tag = (run_dir / "checkpoints" / "latest_complete").read_text().strip()
    assert tag == f"step_{STEPS:08d}"
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    # The exported model loads with transformers and scores tokens from the shards.
    out = tmp_path / "hf"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    meta = json.loads((workdir / "shards" / "meta.json").read_text())
    tokens = np.fromfile(next((workdir / "shards").glob("tokens_*.bin")), dtype=meta["dtype"])[:65].astype(np.int64)
    ids = torch.from_numpy(tokens)[None]
    with torch.no_grad():
        out_ = model(ids[:, :-1], labels=ids[:, :-1])
    assert out_.logits.shape == (1, 64, model.config.vocab_size) and model.config.vocab_size == meta["vocab_size"]
    # Trained for STEPS steps, the model beats a uniform guess over the vocabulary (step 1 was ~ln 512).
    assert out_.loss.item() < np.log(meta["vocab_size"]) - 0.3


def _stop_at(cluster, run_dir: Path, job_id: str, after_step: int, sig: str, full: bool = False) -> None:
    """Send `sig` once step `after_step` is logged: to the job's tasks (like --signal=USR1@...), or with
    `full` to the batch shell and srun as well."""
    _wait(f"step {after_step}", lambda: max(_steps_logged(run_dir), default=0) >= after_step,
          cluster, run_dir, job_id)
    cmd = ["scancel", f"--signal={sig}", *(["--full"] if full else []), job_id]
    assert _sh(cmd, cluster.env).returncode == 0


def _saved_steps(log: str) -> list[int]:
    return [int(x) for x in re.findall(r"stop signal received: checkpoint saved at step (\d+)", log)]


def test_preempt_requeue_resume(slurm_cluster, workdir, uninterrupted):
    """USR1 -> checkpoint + requeue -> resume; SIGTERM at the requeue cap -> checkpoint, no requeue; submitted
    again on one node of the two, it resumes and finishes. Every step runs once; every loss equals the plain run's."""
    c = slurm_cluster
    run_dir = workdir / "runs" / "preempt"
    job_id = _submit(c, workdir, "runs/preempt", "--max-requeues", "1")

    # 1. USR1 to the tasks, and (--full) to the batch shell and srun as well: the shell survives it, the tasks
    #    checkpoint, rank 0 requeues the job.
    _stop_at(c, run_dir, job_id, 3, "USR1", full=True)
    _wait("the requeue", lambda: _job(c, job_id).get("Restarts") == "1", c, run_dir, job_id)
    _wait("the checkpoint message", lambda: _saved_steps(_log(run_dir, job_id)), c, run_dir, job_id)
    log = _log(run_dir, job_id)
    first = _saved_steps(log)[0]
    assert 3 <= first < STEPS
    assert f"requeued Slurm job {job_id} (restart 1 of at most 1)" in log
    assert 0 <= log.find("batch shell got a signal") < log.find("stop signal received"), log

    # 2. The requeued instance resumes at that step. SIGTERM to its tasks (what preemption with a grace time
    #    sends) at the cap (--max-requeues 1): it checkpoints and the job is not requeued.
    _wait("the resume", lambda: f"resumed from step_{first:08d}: step {first}/{STEPS}" in _log(run_dir, job_id),
          c, run_dir, job_id)
    _stop_at(c, run_dir, job_id, first + 3, "TERM")
    job = _wait_done(c, run_dir, job_id)
    log = _log(run_dir, job_id)
    # Rank 0 exits with 128 + SIGTERM (srun --kill-on-bad-exit may SIGTERM a rank still shutting down, too).
    assert job["Restarts"] == "1" and job["JobState"] == "FAILED", job
    assert job["ExitCode"] == f"{128 + signal.SIGTERM}:0", job
    assert "not requeueing: job" in log and "MEGASLM_MAX_REQUEUES=1" in log, log
    second = _saved_steps(log)[-1]
    assert first + 3 <= second < STEPS
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == f"step_{second:08d}"

    # 3. Only one node is free now: `megaslm submit --nodes 1`, the step's batch kept with grad_accum 2. It
    #    resumes the 2-node checkpoint through DeepSpeed's universal checkpoint and finishes.
    job2 = _submit(c, workdir, "runs/preempt", "--nodes", "1", "--set", "train.grad_accum=2")
    job = _wait_done(c, run_dir, job2)
    log2 = _log(run_dir, job2)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log2
    assert "was written by 2 data-parallel ranks, ZeRO-2; this launch has 1 data-parallel rank" in log2, log2
    assert f"resumed from step_{second:08d}: step {second}/{STEPS}" in log2
    assert json.loads((run_dir / "run_info.json").read_text())["slurm"]["slurm_nnodes"] == "1"

    # No step lost or repeated, and the same losses (same data, same updates) as the uninterrupted run.
    assert _steps_logged(run_dir) == list(range(1, STEPS + 1))
    plain, resumed = _losses(uninterrupted[0]), _losses(run_dir)
    assert resumed == pytest.approx(plain, rel=1e-6, abs=1e-7)
