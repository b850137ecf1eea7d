"""The README's first command, shortened: `megaslm demo --quick` end to end, then run again beside a full demo."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_writes_report_plot_and_models(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--quick", "--steps", "6", "--out", str(out), check=True, timeout=900)
    assert "Report:" in res.stdout and "Traceback" not in res.stdout + res.stderr
    assert "built successfully" not in res.stdout and "Processing zero checkpoint" not in res.stdout
    steps = [x for x in res.stdout.splitlines() if x.startswith("step ")]
    assert steps and all(" | elapsed 00:" in x and " | eta 00:" in x for x in steps)
    report = json.loads((out / "report.json").read_text())
    assert set(report["final"]) == {"baseline_clm", "slm", "reference"}
    assert all(v == v for v in report["final"].values())  # not NaN: every run validated
    assert set(report["per_source_selected"]) == {"noisy_train_clean.jsonl", "noisy_train_noise.jsonl"}
    assert all(0 < f <= 1 for f in report["per_source_selected"].values())
    assert (out / "val_loss.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "Held-out loss on clean text" in text
    state = json.loads((out / "demo.json").read_text())
    assert state["complete"] and state["variant"] == "quick" and state["params"]["steps"] == 6
    # The report's wall time covers every phase, the analysis included (it was taken before it once); only the
    # report's own writing (plots, wandb) comes after it.
    assert f"Wall time {report['elapsed_s']:.0f} s, every phase" in text
    assert 0 <= state["elapsed_s"] - report["elapsed_s"] <= 0.05 * state["elapsed_s"]
    # the eval phase: `megaslm eval` on the CLM and SLM runs, its table in the report
    assert set(report["eval"]) == {"baseline_clm", "slm"}
    for name, ev in report["eval"].items():
        assert set(ev["tasks"]) == {"arc_easy", "gsm8k_bpb"}
        assert 0 <= ev["tasks"]["arc_easy"]["acc"] <= 1 and ev["tasks"]["gsm8k_bpb"]["bpb"] > 0
        assert json.loads((out / "eval" / name / "results.json").read_text())["tasks"] == ev["tasks"]
    assert "## Downstream tasks" in text
    for model in ("reference_hf", "slm_hf"):
        assert (out / model / "model.safetensors").is_file()

    # Again: a finished demo is left as it is; the full demo refuses this directory before touching it.
    again = run_cli("demo", "--quick", "--steps", "6", "--out", str(out), check=True)
    assert "Nothing to do" in again.stdout and (out / "report.md").read_text() == text
    full = run_cli("demo", "--out", str(out))
    assert full.returncode == 2 and "holds the quick demo (seed 0), not the full demo" in full.stderr
    assert (out / "report.md").read_text() == text and json.loads((out / "demo.json").read_text()) == state
