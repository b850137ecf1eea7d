"""`megaslm submit`: write a multi-node Slurm batch script for a run into its run directory and sbatch it.

The script is the one in slurm/pretrain.sbatch with the #SBATCH lines filled in and every path absolute, so it
can be read, edited and re-submitted by hand (`sbatch RUN_DIR/megaslm.sbatch`) from any directory. It starts
one task per GPU (or `--tasks-per-node` tasks on a CPU cluster) with srun; each task runs
`megaslm train CONFIG --set ...`, takes its rank from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS and meets the
others at MASTER_ADDR (first host of the allocation) and MASTER_PORT (derived from the job id). The job asks
for a warning signal before its time limit and is requeueable; see megaslm/preempt.py.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from megaslm.errors import UserError

SCRIPT_NAME = "megaslm.sbatch"
DEFAULT_SIGNAL_SECONDS = 600
DEFAULT_MAX_REQUEUES = 3

# The launch code shared by slurm/pretrain.sbatch, slurm/run.sbatch and generated scripts (a test keeps them
# identical): PREPARE, then `SRUN <the command each task runs> &`, then WAIT. PREPARE expects
# MEGASLM_MAX_REQUEUES to be set.
PREPARE = r"""
: "${SLURM_JOB_ID:?is not set: submit this script with sbatch}"

# A job that Slurm keeps requeueing (repeated preemption or node failures) stops after MEGASLM_MAX_REQUEUES.
export MEGASLM_MAX_REQUEUES
restarts=${SLURM_RESTART_COUNT:-0}
if (( restarts > MEGASLM_MAX_REQUEUES )); then
  echo "megaslm: job ${SLURM_JOB_ID} was requeued ${restarts} times" \
       "(MEGASLM_MAX_REQUEUES=${MEGASLM_MAX_REQUEUES}); giving up" >&2
  exit 1
fi

# Rendezvous for torch.distributed: rank 0 runs on the first host of the allocation. The port is derived from
# the job id, so jobs sharing a node do not collide and a requeued job keeps its port.
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
if ! getent hosts "$MASTER_ADDR" >/dev/null; then
  # The node name does not resolve (e.g. several slurmd on one host): use the address Slurm reaches it at.
  MASTER_ADDR=$(scontrol show node "$MASTER_ADDR" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
fi
export MASTER_ADDR
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
# srun no longer inherits --cpus-per-task from the allocation (Slurm 22.05+); pass it on explicitly.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}

echo "megaslm: job ${SLURM_JOB_ID} (restart ${restarts}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks," \
     "master ${MASTER_ADDR}:${MASTER_PORT}"

# The warning signal (--signal without B:) goes to the tasks, which finish their step, checkpoint and requeue
# the job. This shell must not die first if it gets a signal too (scancel --full, --signal=B:...): trapping
# makes `wait` return early, so keep waiting until srun is gone. --kill-on-bad-exit: a rank that crashes takes
# the others down at once instead of leaving them blocked in a collective until the timeout.
trap 'echo "megaslm: batch shell got a signal; waiting for the tasks to checkpoint" >&2' USR1 USR2 TERM
"""
SRUN = "srun --kill-on-bad-exit=1"
WAIT = r"""srun_pid=$!
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
exit "$rc"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `megaslm submit`'s arguments to its sub-parser."""
    p = parser
    p.add_argument("config", help="YAML config of the run")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node, one task each; 0 for a CPU run (gloo) with --tasks-per-node tasks")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node (default: --gpus-per-node, or 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (data loading, threads)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00 or 48:00:00")
    p.add_argument("--job-name", default=None, help="default: megaslm-<run dir name>")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help=f"send USR1 this long before the time limit: checkpoint and requeue "
                        f"(default {DEFAULT_SIGNAL_SECONDS})")
    p.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                   help=f"stop requeueing after this many restarts (default {DEFAULT_MAX_REQUEUES})")
    p.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line, e.g. --sbatch-arg=--constraint=h100 (repeatable)")
    p.add_argument("--subcommand", default="train",
                   help="the megaslm subcommand each task runs with CONFIG (default train)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed on to every task (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="write and print the script; do not submit it")


def megaslm_executable() -> str:
    """Absolute path of the `megaslm` command of this installation (so the script needs no activated env)."""
    beside = Path(sys.executable).parent / "megaslm"
    if beside.is_file():
        return str(beside.absolute())
    found = shutil.which("megaslm")
    return str(Path(found).absolute()) if found else "megaslm"


def time_limit_seconds(value: str) -> int | None:
    """Seconds in a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None for UNLIMITED/INFINITE."""
    if value.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not m:
        raise UserError(f"--time {value!r} is not a Slurm time limit (e.g. 90, 4:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (nums + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if len(nums) == 1:  # minutes
        return nums[0] * 60
    if len(nums) == 2:  # minutes:seconds
        return nums[0] * 60 + nums[1]
    return (nums[0] * 60 + nums[1]) * 60 + nums[2]


def _check_args(a: argparse.Namespace) -> None:
    if a.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {a.nodes}")
    if a.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node must be 0 (CPU) or more, got {a.gpus_per_node}")
    if a.tasks_per_node is not None and a.tasks_per_node < 1:
        raise UserError(f"--tasks-per-node must be at least 1, got {a.tasks_per_node}")
    if a.gpus_per_node > 0 and a.tasks_per_node not in (None, a.gpus_per_node):
        raise UserError(f"--tasks-per-node {a.tasks_per_node} must equal --gpus-per-node {a.gpus_per_node} "
                        f"(one task per GPU)")
    if a.cpus_per_task is not None and a.cpus_per_task < 1:
        raise UserError(f"--cpus-per-task must be at least 1, got {a.cpus_per_task}")
    if a.signal_seconds < 0:
        raise UserError(f"--signal-seconds must be 0 or more, got {a.signal_seconds}")
    if a.max_requeues < 0:
        raise UserError(f"--max-requeues must be 0 or more, got {a.max_requeues}")
    for name in ("partition", "account", "time", "job_name"):
        v = getattr(a, name)
        if v is not None and (not v or re.search(r"\s", v)):
            raise UserError(f"--{name.replace('_', '-')} must be a non-empty word, got {v!r}")
    if a.time is not None:
        limit = time_limit_seconds(a.time)
        if limit is not None and a.signal_seconds >= limit:
            raise UserError(f"--signal-seconds {a.signal_seconds} must be shorter than --time {a.time} "
                            f"({limit} s): the warning would come before the job starts training")
    for extra in a.sbatch_args:
        if not extra.startswith("-") or "\n" in extra:
            raise UserError(f"--sbatch-arg must be one sbatch option such as --constraint=h100, got {extra!r}")


def build_script(a: argparse.Namespace, config: Path, run_dir: Path, workdir: Path,
                 megaslm: str | None = None) -> str:
    """The batch script text for parsed `submit` arguments; config, run_dir and workdir must be absolute."""
    tasks = a.gpus_per_node if a.gpus_per_node > 0 else (a.tasks_per_node or 1)
    name = a.job_name or f"megaslm-{run_dir.name}"
    sb = [f"--job-name={name}", f"--nodes={a.nodes}", f"--ntasks-per-node={tasks}"]
    if a.gpus_per_node > 0:
        sb.append(f"--gpus-per-node={a.gpus_per_node}")
    if a.cpus_per_task:
        sb.append(f"--cpus-per-task={a.cpus_per_task}")
    for opt in ("time", "partition", "account"):
        if getattr(a, opt):
            sb.append(f"--{opt}={getattr(a, opt)}")
    sb += [f"--chdir={workdir}", f"--output={run_dir}/slurm-%j.out", "--open-mode=append", "--requeue",
           f"--signal=USR1@{a.signal_seconds}", *a.sbatch_args]
    cmd = [megaslm or megaslm_executable(), a.subcommand, str(config)]
    for item in a.overrides:
        cmd += ["--set", item]
    srun = f"{SRUN} {' '.join(shlex.quote(c) for c in cmd)} &\n"
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    header = [
        "#!/bin/bash",
        f"# Written by `megaslm submit` on {stamp}; re-submit with: sbatch {run_dir / SCRIPT_NAME}",
        f"# Backend: {'nccl, one task per GPU' if a.gpus_per_node > 0 else 'gloo on CPU'}.",
        *(f"#SBATCH {shlex.quote(x)}" for x in sb),
        "",
        "set -euo pipefail",
        f"MEGASLM_MAX_REQUEUES={a.max_requeues}",
    ]
    return "\n".join(header) + "\n" + PREPARE + srun + WAIT


def run(args: argparse.Namespace) -> int:
    """Write RUN_DIR/megaslm.sbatch, print it (--dry-run) or sbatch it; the job id is the last line printed."""
    from megaslm.config import load_config

    _check_args(args)
    config = Path(args.config)
    if not config.is_file():
        raise UserError(f"config file not found: {args.config}")
    cfg = load_config(config, args.overrides)
    tasks = args.nodes * (args.gpus_per_node or args.tasks_per_node or 1)
    if tasks % cfg.parallel.tensor:
        raise UserError(f"parallel.tensor={cfg.parallel.tensor} does not divide the {tasks} tasks of "
                        f"--nodes {args.nodes} x {args.gpus_per_node or args.tasks_per_node or 1} per node")
    workdir = Path.cwd().absolute()
    # The tasks run in `workdir` (--chdir), so relative paths in the config mean what they mean here.
    run_dir = (workdir / cfg.run.dir).absolute()
    sbatch = shutil.which("sbatch")
    if not args.dry_run and sbatch is None:
        raise UserError("sbatch not found on PATH: is this a Slurm login node? (use --dry-run to only write "
                        "the script)")
    text = build_script(args, config.absolute(), run_dir, workdir)
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT_NAME
    script.write_text(text)
    script.chmod(0o755)
    if args.dry_run:
        print(text, end="")
        print(f"# (dry run) script written to {script}")
        return 0
    res = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(f"sbatch {script} failed: {res.stderr.strip() or res.stdout.strip()}")
    job_id = res.stdout.strip().splitlines()[-1].split(";")[0]
    print(f"script: {script}")
    print(f"log: {run_dir}/slurm-{job_id}.out")
    print(job_id)
    return 0
