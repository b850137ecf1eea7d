"""`megaslm recipe rho1-math`'s own parts without training: its directory rules and phases (fake phases), the
steps SLM needs to reach CLM's final figure, and the report built from runs' in-loop evaluation records."""

from __future__ import annotations

import json

import pytest

from megaslm.errors import UserError
from megaslm.recipe import rho1_math
from megaslm.recipe.results import steps_to_reach, write_report


def test_steps_to_reach_interpolates_from_the_base_at_step_0():
    clm = [[10, 0.9], [20, 0.8], [40, 0.7]]
    slm = [[10, 0.85], [20, 0.7], [40, 0.6]]
    assert steps_to_reach(slm, 1.0, 0.7, higher=False) == 20.0  # reached exactly at an evaluation
    assert steps_to_reach(slm, 1.0, 0.775, higher=False) == pytest.approx(10 + 10 * (0.775 - 0.85) / (0.7 - 0.85))
    assert steps_to_reach(slm, 1.0, 0.95, higher=False) == pytest.approx(10 * 0.05 / 0.15)  # before the first eval
    assert steps_to_reach(clm, 1.0, 0.6, higher=False) is None  # never
    assert steps_to_reach([[10, 0.3], [20, 0.5]], 0.2, 0.4, higher=True) == pytest.approx(15.0)


@pytest.fixture
def fake_phases(monkeypatch):
    ran = []

    def make(name):
        def phase(j):
            ran.append(name)
            if name == "clm" and not (j.root / "clm.ok").exists():
                (j.root / "clm.ok").write_text("")
                from megaslm.phases import StepFailed

                raise StepFailed("megaslm train clm.yaml", 3)
        return name, phase

    monkeypatch.setattr(rho1_math, "PHASES", [make(n) for n in ("base", "reference", "clm", "report")])
    return ran


def test_a_failed_phase_is_resumed_and_other_settings_are_refused(tmp_path, fake_phases, capsys):
    root = tmp_path / "r"
    assert rho1_math.run_recipe(str(root), steps=5) == 3
    assert "error: phase 'clm' stopped: `megaslm train clm.yaml` exited with code 3" in capsys.readouterr().out
    state = json.loads((root / "recipe.json").read_text())
    assert state["phases_done"] == ["base", "reference"] and state["params"]["steps"] == 5
    assert rho1_math.run_recipe(str(root), steps=5) == 0
    assert fake_phases == ["base", "reference", "clm", "clm", "report"]
    state = json.loads((root / "recipe.json").read_text())
    assert state["complete"] and set(state["phase_seconds"]) == {"base", "reference", "clm", "report"}
    with pytest.raises(UserError, match=r"other settings \(steps 5 there, 7 here\)"):
        rho1_math.run_recipe(str(root), steps=7)
    assert rho1_math.run_recipe(str(root), steps=5) == 0 and "Nothing to do" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(UserError, match="holds no megaslm recipe"):
        rho1_math.run_recipe(str(tmp_path / "other"))
    with pytest.raises(UserError, match="--ratio must be in"):
        rho1_math.run_recipe(str(tmp_path / "new"), ratio=1.5)
    with pytest.raises(UserError, match="--clean .*: no such file"):
        rho1_math.run_recipe(str(tmp_path / "new"), clean=[str(tmp_path / "missing.jsonl")])


def test_speedup_counts_from_where_clm_itself_first_reaches_its_final():
    from megaslm.recipe.results import speedup

    # CLM improves steadily: its own reach is its last step
    assert speedup([[10, 0.9], [20, 0.8]], [[10, 0.8], [20, 0.7]], 1.0, higher=False) == (10.0, 20.0, 2.0)
    # CLM dips to 0.6486 at step 10 and ends at 0.6612 (seed 1's GSM8K): both curves reach 0.6612 in the first
    # interval from the base; the ratio is theirs, not 40 / 1.6
    clm = [[10, 0.6486], [20, 0.6632], [30, 0.6622], [40, 0.6612]]
    slm = [[10, 0.6459], [20, 0.6640], [30, 0.6607], [40, 0.6594]]
    s, c, r = speedup(clm, slm, 0.6641, higher=False)
    assert s == pytest.approx(10 * 0.0029 / 0.0182) and c == pytest.approx(10 * 0.0029 / 0.0155)
    assert r == pytest.approx(c / s) and r < 1.2
    assert speedup(clm, slm, 0.6600, higher=False) == (None, None, None)  # CLM ends worse than the base
    assert speedup([[10, 0.9]], [[10, 0.95]], 1.0, higher=False)[0] is None  # SLM never reaches it


def _metrics(run, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_tables_figures_and_json_from_the_runs_records(tmp_path):
    root = tmp_path
    (root / "eval" / "base").mkdir(parents=True)
    (root / "eval" / "base" / "results.json").write_text(json.dumps(
        {"tasks": {"math500_0shot_bpb": {"bpb": 1.0, "n": 20}, "arc_easy": {"acc": 0.5, "n": 20}}}))
    _metrics(root / "runs" / "clm", [{"step": 1, "loss": 2.0}, {"step": 10, "eval/math500_0shot_bpb/bpb": 0.9,
                                                                "eval/arc_easy/acc": 0.5},
                                     {"step": 20, "eval/math500_0shot_bpb/bpb": 0.8, "eval/arc_easy/acc": 0.55}])
    _metrics(root / "runs" / "slm", [{"step": 10, "eval/math500_0shot_bpb/bpb": 0.8, "eval/arc_easy/acc": 0.5},
                                     {"step": 20, "eval/math500_0shot_bpb/bpb": 0.7, "eval/arc_easy/acc": 0.5}])
    p = dict(rho1_math.DEFAULTS)
    state = {"seed": 0, "base_dir": "/b", "phase_seconds": {"clm": 12.0}}
    md = write_report(root, p, state, 1024, 99.0).read_text()
    rep = json.loads((root / "report.json").read_text())
    m = rep["tasks"]["math500_0shot_bpb"]["bpb"]
    assert m["base"] == 1.0 and m["clm"] == [[10, 0.9], [20, 0.8]] and m["slm_final"] == 0.7
    assert m["slm_steps_to_clm_final"] == 10.0 and m["clm_steps_to_clm_final"] == 20.0 and m["speedup"] == 2.0
    acc = rep["tasks"]["arc_easy"]["acc"]
    assert acc["higher_is_better"] and acc["slm_steps_to_clm_final"] is None
    assert rep["phase_seconds"] == {"clm": 12.0} and rep["tokens_per_step"] == 1024
    assert "| 10 | 1.0000 | 0.9000 | 0.8000 |" in md and "at step 10.0, CLM at step 20.0 (2.0x fewer steps" in md
    assert not acc["clm_improved_on_base"] or acc["slm_steps_to_clm_final"] is None
    for name in rep["plots"]:
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name})" in md


def test_cli_refuses_a_base_that_is_no_model_before_writing_anything(tmp_path, capsys):
    from megaslm.cli import main

    out = tmp_path / "out"
    assert main(["recipe", "rho1-math", "--out", str(out), "--base", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --base {tmp_path}: not a Hugging Face model directory (no config.json)"]
    assert not out.exists()
