"""The command line: help, error paths (exit code 2, one line naming the problem), a single-process run."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli, write_config


def assert_one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
    lines = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, res.stderr[-4000:]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def base(run_dir, data, **over):
    cfg = {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"}, "data": {"train": data["train"]},
           "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 2}, "wandb": {"mode": "disabled"}}
    for k, v in over.items():
        sec, key = k.split(".")
        cfg.setdefault(sec, {})[key] = v
    return cfg


def test_help_lists_every_subcommand():
    res = run_cli("--help")
    assert res.returncode == 0
    for sub in ("tokenizer", "prepare", "train", "export", "submit", "score", "demo"):
        assert sub in res.stdout


def test_prepare_missing_input(tmp_path, tiny_data):
    res = run_cli("prepare", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", tiny_data["tok"],
                  "--out", str(tmp_path / "s"))
    assert_one_line_error(res, "nope.jsonl")
    assert not (tmp_path / "s").exists()


def test_tokenizer_train_missing_input(tmp_path):
    res = run_cli("tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "100",
                  "--out", str(tmp_path / "tok"))
    assert_one_line_error(res, "missing.txt")


def test_train_unknown_config_key(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.yaml", base(tmp_path / "r", tiny_data))
    res = run_cli("train", str(cfg), "--set", "train.bogus=1")
    assert_one_line_error(res, "--set train.bogus=1: unknown config key 'train.bogus'")


def test_train_missing_config_file(tmp_path):
    res = run_cli("train", str(tmp_path / "absent.yaml"))
    assert_one_line_error(res, "absent.yaml")


def test_train_refuses_valid_shards_from_another_tokenizer(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.yaml", base(tmp_path / "r", tiny_data, **{"data.valid": tiny_data["valid_other"]}))
    res = run_cli("train", str(cfg))
    assert_one_line_error(res, "valid_other", "512", "600")


def test_train_refuses_model_vocab_that_differs_from_shards(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "c.yaml", base(tmp_path / "r", tiny_data, **{"model.vocab_size": 1000}))
    res = run_cli("train", str(cfg))
    assert_one_line_error(res, "512", "1000")


def test_export_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    res = run_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "out"))
    assert_one_line_error(res, "run")


def test_single_plain_process_run(tmp_path, tiny_data):
    """No launcher at all: a world of one; the resolved config and metrics are written."""
    run_dir = tmp_path / "r"
    cfg = write_config(tmp_path / "c.yaml", base(run_dir, tiny_data))
    res = run_cli("train", str(cfg), "--set", "train.steps=3", check=True)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert "steps: 3" in (run_dir / "config.yaml").read_text()
    # Re-running a finished run is a no-op that says so.
    res = run_cli("train", str(cfg), "--set", "train.steps=3", check=True)
    assert "step 3/3" in res.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    # Activation checkpointing recomputes the same numbers: same losses, step for step.
    ac_dir = tmp_path / "ac"
    run_cli("train", str(cfg), "--set", "train.steps=3", "--set", f"run.dir={ac_dir}",
            "--set", "model.activation_checkpointing=true", check=True)
    for a, b in zip(read_metrics(run_dir), read_metrics(ac_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_deepspeed_launcher(tmp_path, tiny_data):
    """`deepspeed --num_gpus 2 $(which megaslm) train CFG`: the launcher's --local_rank argument is accepted."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from megaslm.parallel.dist import free_port

    run_dir = tmp_path / "r"
    cfg = write_config(tmp_path / "c.yaml", base(run_dir, tiny_data))
    bindir = Path(sys.executable).parent
    megaslm = shutil.which("megaslm", path=str(bindir)) or shutil.which("megaslm")
    cmd = [str(bindir / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), megaslm, "train", str(cfg)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((run_dir / "run_info.json").read_text())["world_size"] == 2
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
