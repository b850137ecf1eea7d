"""Commands made of phases that resume where they stopped (`megaslm demo`, `megaslm recipe`).

Such a command owns one directory. DIR/<state file> (JSON) records what the directory holds (its identity: kind,
seed, settings), the phases done and the seconds spent over every invocation. The directory is checked before
anything is written (`read_state`): a new or empty directory starts afresh; one holding files but no state file
is refused; the caller refuses a state of another identity. Run again, the command skips the phases done and
continues with the first one that is not (an interrupted training resumes from its checkpoint); a phase that
fails keeps everything done before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megaslm import run_files
from megaslm.atomic import write_json
from megaslm.errors import UserError
from megaslm.monitor import hms
from megaslm.parallel.dist import free_port


class StepFailed(Exception):
    """A command a phase ran exited non-zero; its own output (its error line) has already been printed."""

    def __init__(self, what: str, code: int):
        super().__init__(what)
        self.what, self.code = what, code


def run_cmd(what: str, cmd: list[str], env: dict | None = None) -> None:
    code = subprocess.run(cmd, env=env).returncode
    if code != 0:
        raise StepFailed(what, code)


def megaslm(*args: str) -> None:
    """`megaslm ARGS` in a child process (StepFailed when it exits non-zero)."""
    run_cmd(f"megaslm {args[0]}", [sys.executable, "-m", "megaslm.cli", *args])


def train(cfg: dict, path: Path, nproc: int = 2) -> None:
    """Write `cfg` to `path` and run `megaslm train` on it in `nproc` processes (one thread each)."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # megaslm.parallel.launch is torchrun that ends a failed worker with one line instead of a traceback.
    cmd = [sys.executable, "-m", "megaslm.parallel.launch", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "megaslm.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "WANDB_SILENT": "true"}
    run_cmd(f"megaslm train {path.name}", cmd, env)


def read_metrics(run_dir: Path) -> list[dict]:
    return run_files.metrics(run_dir)


def differences(old: dict, new: dict) -> str:
    """The settings two identities ({"seed", "params"}) disagree on, as `key A there, B here; ...`."""
    diffs = [f"seed {old.get('seed')} there, {new['seed']} here"] if old.get("seed") != new["seed"] else []
    op, np_ = old.get("params") or {}, new["params"]
    diffs += [f"{k} {op.get(k)} there, {np_.get(k)} here" for k in sorted(set(op) | set(np_)) if op.get(k) != np_.get(k)]
    return "; ".join(diffs)


def read_state(root: Path, state_name: str, what: str) -> dict | None:
    """The saved state of `root`: None for a new or empty directory, else the parsed state file. A path that is
    not a directory, a non-empty directory without the state file and an unreadable one are refused."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise UserError(f"--out {root}: exists and is not a directory")
    state_file = root / state_name
    if not state_file.is_file():
        if any(root.iterdir()):
            raise UserError(f"--out {root}: the directory is not empty and holds no {what} (no {state_name}; "
                            f"one written by an earlier megaslm has none either): pass --out with a new directory, "
                            "or remove this one")
        return None
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{state_file}: unreadable ({e}); remove {root} or pass --out with a new directory") from None


class Console:
    """`[tag] message` lines; `prefix` ("4/8 ") starts the first line of the phase that runs."""

    def __init__(self, tag: str):
        self.tag, self.prefix = tag, ""

    def say(self, msg: str) -> None:
        print(f"[{self.tag}] {msg}", flush=True)

    def phase(self, msg: str) -> None:
        self.say(f"{self.prefix}{msg}")


@dataclass
class Job:
    """One resumable run in `root`; `state` is what the state file records, saved after every phase."""

    root: Path
    ident: dict
    state_name: str
    console: Console
    state: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)

    @property
    def p(self) -> dict:
        return self.ident["params"]

    @property
    def seed(self) -> int:
        return self.ident["seed"]

    def elapsed(self) -> float:
        """Seconds spent on this job, over every invocation that worked on it (a resumed one included)."""
        return self.state.get("elapsed_s", 0.0) + time.time() - self.t_start

    def save(self, **changes) -> None:
        self.state.update(self.ident, **changes)
        write_json(self.root / self.state_name, {**self.state, "elapsed_s": round(self.elapsed(), 1)})

    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def timed(self, name: str, seconds: float) -> None:
        """Record a phase's wall time (the report's time split)."""
        self.state.setdefault("phase_seconds", {})[name] = round(seconds, 1)


def run_phases(job: Job, phases: list) -> int:
    """Run every phase of `phases` ([(name, fn(job))]) not recorded as done, saving the state after each; the
    exit code (a failed phase's command's, or 1)."""
    job.root.mkdir(parents=True, exist_ok=True)
    done = list(job.state.get("phases_done", []))
    job.save(phases_done=done, complete=False)
    todo = [name for name, _ in phases if name not in done]
    for i, (name, fn) in enumerate(phases, 1):
        if name in done:
            continue
        job.console.prefix = f"{i}/{len(phases)} (at {hms(job.elapsed())}) "
        t0 = time.time()
        try:
            fn(job)
        except StepFailed as e:
            job.console.say(f"error: phase '{name}' stopped: `{e.what}` exited with code {e.code} (its error is "
                            f"above); the phases done are kept: run the same command again to continue from "
                            f"'{name}'")
            job.save()
            return e.code if 0 < e.code < 128 else 1
        done.append(name)
        job.timed(name, time.time() - t0)
        job.save(phases_done=done, complete=name == todo[-1])
    return 0
