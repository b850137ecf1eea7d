"""megaslm/run_files.py: the one reader of a run directory's config.yaml, run_info.json and metrics.jsonl."""

import json

import pytest

from megaslm import run_files
from megaslm.errors import UserError


def test_saved_config_reads_back_and_is_none_when_missing_or_broken(tmp_path):
    assert run_files.saved_config(tmp_path) is None
    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.001\n")
    assert run_files.saved_config(tmp_path) == {"train": {"lr": 0.001}}
    (tmp_path / "config.yaml").write_text("train: [unclosed\n")
    assert run_files.saved_config(tmp_path) is None
    (tmp_path / "config.yaml").write_text("- a list, not a config\n")
    assert run_files.saved_config(tmp_path) is None


def test_run_config_names_the_file_when_it_is_not_a_run_dir(tmp_path):
    with pytest.raises(UserError, match=r"config\.yaml: missing or unreadable .*megaslm run directory"):
        run_files.run_config(tmp_path)
    assert not run_files.is_run_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("run: {dir: x}\n")
    (tmp_path / "checkpoints").mkdir()
    assert run_files.is_run_dir(tmp_path) and run_files.run_config(tmp_path) == {"run": {"dir": "x"}}


def test_metrics_skip_a_line_cut_by_a_crash(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl"):
        run_files.metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n"
                                            + '{"step": 3, "lo')
    assert [r["step"] for r in run_files.metrics(tmp_path)] == [1, 2]


def test_run_info_is_none_when_missing_and_one_error_when_broken(tmp_path):
    assert run_files.run_info(tmp_path) is None
    (tmp_path / "run_info.json").write_text('{"dtype": "float32"}')
    assert run_files.run_info(tmp_path) == {"dtype": "float32"}
    (tmp_path / "run_info.json").write_text('{"dtype": ')
    with pytest.raises(UserError, match=r"run_info\.json: unreadable"):
        run_files.run_info(tmp_path)
