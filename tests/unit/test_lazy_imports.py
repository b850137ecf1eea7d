"""The refusals that need no model come before torch loads (seconds on a loaded node): a bad config, a second
launch on a live run directory (the lease), `megaslm --help`, an unknown eval task. Each case runs in a fresh
interpreter and reads its sys.modules, so an import that pulls torch in early fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import yaml

from megaslm.data.shards import ShardWriter
from tests.conftest import REPO

HEAVY = ("torch", "transformers", "deepspeed", "lm_eval", "datasets")


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """`code` in a new interpreter; it prints the heavy modules it loaded as its last stdout line (JSON)."""
    tail = f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}  # one rank
    return subprocess.run([sys.executable, "-c", code + tail], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


def cli(*args: str) -> str:
    """Code that runs `megaslm ARGS` and prints its exit status."""
    return (f"from megaslm.cli import main\ntry:\n    code = main({list(args)!r})\nexcept SystemExit as e:\n"
            "    code = e.code\nprint(code)")


def loaded(res: subprocess.CompletedProcess) -> list[str]:
    assert res.stdout.strip(), res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def slm_config(tmp_path, **slm) -> str:
    shards = tmp_path / "shards"
    with ShardWriter(str(shards), 64, "f" * 64, 1, ["x"]) as w:
        w.add_document(np.arange(2, 40), 0)
        w.close()
    cfg = {"run": {"dir": str(tmp_path / "run")}, "data": {"train": str(shards)}, "objective": "slm",
           "slm": {"score": "entropy", "weighting": "soft", **slm}, "reference": {"combine": "min"},
           "eval": {"tasks": ["arc_easy"]}, "wandb": {"mode": "disabled"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_loading_and_validating_a_config_loads_no_torch(tmp_path):
    path = slm_config(tmp_path)
    res = run_fresh(f"import megaslm.config\ncfg = megaslm.config.load_config({path!r})\n"
                    "print(cfg.slm.weighting, cfg.slm.score)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "soft entropy"  # every rule and source registered, torch-free
    assert loaded(res) == []


def test_a_bad_config_is_refused_before_torch_loads(tmp_path):
    path = slm_config(tmp_path, temperature=0)
    res = run_fresh(cli("train", path))
    assert res.stderr.strip().startswith("error: ") and "slm.temperature must be > 0" in res.stderr
    assert res.stdout.splitlines()[0] == "2" and loaded(res) == []


def test_a_second_launch_is_refused_before_torch_loads(tmp_path):
    path = slm_config(tmp_path)
    now = time.time()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lease.json").write_text(json.dumps({  # a live run on another node
        "host": "node9", "pid": 1, "machine": "another-node", "started": now - 60, "heartbeat": now,
        "stale_after_s": 300.0, "token": "f0reign"}))
    res = run_fresh(cli("train", path))
    assert "is in use by a live run: pid 1 on host node9" in res.stderr, res.stderr
    assert res.stdout.splitlines()[0] == "2" and loaded(res) == []


def test_help_loads_no_model_code():
    res = run_fresh(cli("--help") + "\nimport sys\nprint('megaslm.reference.score' in sys.modules)")
    assert "train" in res.stdout and "eval" in res.stdout
    assert res.stdout.splitlines()[-3:-1] == ["0", "False"] and loaded(res) == []


def test_an_unknown_eval_task_is_one_line_before_lm_eval_loads(tmp_path):
    res = run_fresh(cli("eval", str(tmp_path), "--tasks", "arc_easy,arc_esay"))
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --tasks: unknown task arc_esay (built-in: "), res.stderr
    assert res.stdout.splitlines()[0] == "2" and loaded(res) == []
