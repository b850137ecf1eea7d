"""`megaslm plan` and the up-front checks through the command line: exit codes and the one-line messages."""

from __future__ import annotations

import json

from tests.conftest import run_cli, write_config
from tests.integration.test_cli import assert_one_line_error, base


def test_plan_prints_memory_per_device_in_gib():
    res = run_cli("plan", "configs/slm_1b.yaml", "--nodes", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "memory per device: " in res.stdout and " GiB" in res.stdout
    assert "80.00B tokens" in res.stdout and "GPU-hours" in res.stdout


def test_plan_json_and_table():
    res = run_cli("plan", "configs/slm_7b.yaml", "--nodes", "16", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    p = json.loads(res.stdout)
    assert p["hardware"]["gpus"] == 128 and p["memory_total_bytes"] == sum(p["memory_bytes"].values())
    res = run_cli("plan", "configs/slm_1b.yaml", "configs/slm_1b_cached.yaml", "--nodes", "4", "--table")
    rows = [x for x in res.stdout.splitlines() if x.startswith("| slm_1b")]
    assert res.returncode == 0 and len(rows) == 2, res.stdout


def test_plan_that_does_not_fit_warns_and_fails_only_with_check():
    args = ("plan", "configs/slm_7b.yaml", "--nodes", "1", "--set", "model.activation_checkpointing=false")
    res = run_cli(*args)
    assert res.returncode == 0 and "WARNING" in res.stdout and "does not fit" in res.stdout
    assert run_cli(*args, "--check").returncode == 1


def test_plan_refuses_seq_len_beyond_positions(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", base(tmp_path / "r", {"train": "shards/none"}))
    res = run_cli("plan", str(cfg), "--set", "train.seq_len=100000")
    assert_one_line_error(res, "train.seq_len 100000", "max_position_embeddings 2048", "model.preset tiny")


def test_train_refuses_seq_len_beyond_positions_before_any_engine(tmp_path, tiny_data):
    run_dir = tmp_path / "r"
    cfg = write_config(tmp_path / "c.yaml", base(run_dir, tiny_data, **{"train.seq_len": 100000}))
    res = run_cli("train", str(cfg))
    assert_one_line_error(res, "train.seq_len 100000", "max_position_embeddings 2048")
    assert not run_dir.exists()  # refused before the run directory, process group or engine


def test_train_refuses_reference_with_fewer_positions(tmp_path, tiny_data):
    from megaslm.model.presets import preset_config

    ref = tmp_path / "ref"
    c = preset_config("tiny", 512)
    c.max_position_embeddings = 16
    c.save_pretrained(ref)
    over = {"objective": "slm", "reference": {"path": str(ref)}}
    cfg = write_config(tmp_path / "c.yaml", {**base(tmp_path / "r", tiny_data), **over})
    for cmd in ("train", "plan"):
        res = run_cli(cmd, str(cfg))
        assert_one_line_error(res, "train.seq_len 32", "max_position_embeddings 16", f"reference.path {ref}")


def test_train_refuses_reference_with_another_vocabulary(tmp_path, tiny_data):
    from megaslm.model.presets import preset_config

    ref = tmp_path / "ref"
    preset_config("tiny", 600).save_pretrained(ref)
    over = {"objective": "slm", "reference": {"path": str(ref)}}
    cfg = write_config(tmp_path / "c.yaml", {**base(tmp_path / "r", tiny_data), **over})
    res = run_cli("train", str(cfg))
    assert_one_line_error(res, "vocab_size 600", "512", f"reference.path {ref}")
    assert not (tmp_path / "r").exists()


