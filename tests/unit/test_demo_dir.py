"""The demo's directory rules, with fake phases (no training): each variant its own default directory, refusal of
another variant's or another configuration's run before anything is written, continuation after a failed phase."""

import json
import os

import pytest

from megaslm import demo
from megaslm.errors import UserError
from tests.conftest import run_cli


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.fixture
def fake_phases(monkeypatch):
    """Phases that write one file each into the demo directory and record the order they ran in."""
    ran, fail = [], set()

    def make(name):
        def phase(d):
            ran.append(name)
            if name in fail:
                raise demo.StepFailed(f"megaslm {name}", 2)
            (d.root / f"{name}.out").write_text(name)
        return name, phase

    monkeypatch.setattr(demo, "PHASES", [make(n) for n in ("corpora", "train", "report")])
    return ran, fail


def test_variants_default_to_their_own_directories(tmp_path, monkeypatch, fake_phases, capsys):
    ran, _ = fake_phases
    monkeypatch.chdir(tmp_path)
    assert demo.run_demo() == 0
    assert demo.run_demo(quick=True) == 0
    assert ran == ["corpora", "train", "report"] * 2
    full, quick = (json.loads((tmp_path / d / "demo.json").read_text()) for d in ("demo_run", "demo_quick"))
    assert (full["variant"], quick["variant"]) == ("full", "quick")
    assert full["complete"] and quick["complete"]
    assert full["params"]["steps"] == demo.FULL["steps"] and quick["params"]["steps"] == demo.QUICK["steps"]
    # A finished demo run again is left as it is: nothing runs, nothing is rewritten.
    before = snapshot(tmp_path)
    assert demo.run_demo() == 0
    assert ran == ["corpora", "train", "report"] * 2 and snapshot(tmp_path) == before
    assert "already holds the full demo (seed 0)" in capsys.readouterr().out


@pytest.mark.parametrize("quick, other, expect", [
    (False, dict(quick=True), "holds the quick demo (seed 0), not the full demo (seed 0)"),
    (True, dict(quick=False), "holds the full demo (seed 0), not the quick demo (seed 0)"),
    (True, dict(quick=True, steps=7), f"with other settings (ref_steps 7 there, {demo.QUICK['ref_steps']} here; "
                                      f"steps 7 there, {demo.QUICK['steps']} here)"),
    (True, dict(quick=True, seed=3), "with other settings (seed 3 there, 0 here)"),
])
def test_another_variant_or_config_is_refused_before_anything_is_written(tmp_path, fake_phases, quick, other,
                                                                        expect):
    ran, _ = fake_phases
    root = tmp_path / "d"
    assert demo.run_demo(str(root), **other) == 0
    before, n = snapshot(root), len(ran)
    with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        demo.run_demo(str(root), quick=quick)
    assert snapshot(root) == before and len(ran) == n


def test_a_directory_that_holds_no_demo_is_refused(tmp_path, fake_phases):
    root = tmp_path / "d"
    (root / "runs").mkdir(parents=True)  # e.g. a demo written by a megaslm without demo.json
    with pytest.raises(UserError, match="not empty and holds no megaslm demo"):
        demo.run_demo(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["runs"]
    assert demo.run_demo(str(tmp_path / "empty_is_fine")) == 0


def test_a_failed_phase_stops_with_its_code_and_the_next_call_continues_there(tmp_path, fake_phases, capsys):
    ran, fail = fake_phases
    root = tmp_path / "d"
    fail.add("train")
    assert demo.run_demo(str(root), quick=True) == 2
    out = capsys.readouterr().out
    assert "error: phase 'train' stopped: `megaslm train` exited with code 2" in out
    state = json.loads((root / "demo.json").read_text())
    assert state["phases_done"] == ["corpora"] and not state["complete"]
    fail.clear()
    assert demo.run_demo(str(root), quick=True) == 0
    assert ran == ["corpora", "train", "train", "report"]
    assert "continuing the quick demo (seed 0)" in capsys.readouterr().out
    state = json.loads((root / "demo.json").read_text())
    assert state["complete"] and state["phases_done"] == ["corpora", "train", "report"]


def test_cli_refusal_is_one_error_line_with_exit_code_2(tmp_path):
    root = tmp_path / "demo_quick"
    root.mkdir()
    (root / "demo.json").write_text(json.dumps({**demo.demo_settings(quick=True), "complete": True}))
    before = snapshot(root)
    res = run_cli("demo", "--out", str(root))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"error: --out {os.path.realpath(root)}: holds the quick demo (seed 0), not the full demo (seed 0); "
        "`megaslm demo` writes to ./demo_run by default: pass --out with another directory, or remove this one"]
    assert snapshot(root) == before
