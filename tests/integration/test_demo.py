"""The README's first command, shortened: `megaslm demo --quick` end to end."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_writes_report_plot_and_models(tmp_path):
    out = tmp_path / "demo"
    res = run_cli("demo", "--quick", "--steps", "6", "--out", str(out), check=True, timeout=900)
    assert "Report:" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["final"]) == {"baseline_clm", "slm", "reference"}
    assert all(v == v for v in report["final"].values())  # not NaN: every run validated
    assert set(report["per_source_selected"]) == {"noisy_train_clean.jsonl", "noisy_train_noise.jsonl"}
    assert all(0 < f <= 1 for f in report["per_source_selected"].values())
    assert (out / "val_loss.png").stat().st_size > 10_000
    assert "Held-out loss on clean text" in (out / "report.md").read_text()
    # the eval phase: `megaslm eval` on the CLM and SLM runs, its table in the report
    assert set(report["eval"]) == {"baseline_clm", "slm"}
    for name, ev in report["eval"].items():
        assert set(ev["tasks"]) == {"arc_easy", "gsm8k_bpb"}
        assert 0 <= ev["tasks"]["arc_easy"]["acc"] <= 1 and ev["tasks"]["gsm8k_bpb"]["bpb"] > 0
        assert json.loads((out / "eval" / name / "results.json").read_text())["tasks"] == ev["tasks"]
    assert "## Downstream tasks" in (out / "report.md").read_text()
    for model in ("reference_hf", "slm_hf"):
        assert (out / model / "model.safetensors").is_file()
