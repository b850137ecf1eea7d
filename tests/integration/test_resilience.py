"""Runs that survive their own failures (2 gloo ranks, real DeepSpeed): a damaged latest checkpoint, a save that
fails for want of space, NaN and spiking losses, and the profiler."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.conftest import read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow

STEPS = 6


def config(run_dir, data, zero="zero2", **train):
    t = {"steps": STEPS, "seq_len": 32, "micro_batch_size": 2, "save_every": 2, "keep_checkpoints": 10,
         "lr": 2e-3, "warmup_steps": 2, "seed": 3}
    t.update(train)
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": data["train"], "tokenizer": data["tok"]},
            "train": t, "deepspeed": {"config": f"ds_configs/{zero}.json"}, "wandb": {"mode": "disabled"}}


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def error_lines(res) -> list[str]:
    return [x for x in res.stderr.splitlines() if x.startswith("error: ")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """An uninterrupted run (checkpoints at 2, 4, 6), profiled at steps 2..3."""
    root = tmp_path_factory.mktemp("resilience")
    run = root / "ref"
    cfg = write_config(root / "ref.yaml", config(run, tiny_data, profile_steps=[2, 3]))
    res = run_cli("train", str(cfg), nproc=2, check=True)
    return run, losses(run), res


def test_profiler_writes_a_chrome_trace_and_a_table(reference):
    run, _, res = reference
    trace = json.loads((run / "profile" / "trace_steps_2-3.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"megaslm step 2", "megaslm step 3"} <= names and "megaslm step 4" not in names
    assert any(n and n.startswith("aten::") for n in names)
    table = (run / "profile" / "top_ops_steps_2-3.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert "top 15 operators by self time" in res.stdout and "profiler trace written to" in res.stdout
    assert [r["skipped_steps"] for r in read_metrics(run)] == [0] * STEPS


def test_damaged_latest_checkpoint_falls_back_and_matches_uninterrupted_run(tmp_path, tiny_data, reference):
    ref_run, ref, _ = reference
    run = tmp_path / "damaged"
    shutil.copytree(ref_run, run)
    damaged = run / "checkpoints" / "step_00000006" / "mp_rank_00_model_states.pt"
    os.truncate(damaged, damaged.stat().st_size // 2)

    # export verifies the same way: it names the file and exports the newest checkpoint that passes.
    res = run_cli("export", str(run), "--out", str(tmp_path / "hf"), check=True)
    assert f"checkpoint step_00000006 is unusable: {damaged}" in res.stderr
    assert "using step_00000004, the newest checkpoint that passes" in res.stderr
    assert json.loads((tmp_path / "hf" / "megaslm_export.json").read_text())["tag"] == "step_00000004"

    cfg = write_config(tmp_path / "damaged.yaml", config(run, tiny_data))
    res = run_cli("train", str(cfg), nproc=2, check=True)
    out = res.stdout
    assert f"checkpoint step_00000006 is unusable: {damaged}: " in out and "cut short" in out
    assert "falling back to step_00000004" in out and "resumed from step_00000004" in out
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000006"
    assert run_cli("export", str(run), "--out", str(tmp_path / "hf2"), check=True).stderr.count("unusable") == 0


def test_load_failing_half_way_falls_back_to_a_clean_load(tmp_path, tiny_data, reference):
    """A checkpoint without a manifest (as written before manifests) whose optimizer file is damaged inside:
    DeepSpeed loads the module weights, then fails on the optimizer state. The older checkpoint must then load
    completely: the later losses equal the uninterrupted run's."""
    import zipfile

    ref_run, ref, _ = reference
    run = tmp_path / "half"
    shutil.copytree(ref_run, run)
    tag = run / "checkpoints" / "step_00000006"
    (tag / "manifest.json").unlink()
    damaged = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(damaged) as z:
        rec = z.infolist()[0]  # the pickle, read first
    data = bytearray(damaged.read_bytes())
    data[rec.header_offset + 30 + len(rec.filename.encode()) + len(rec.extra) + rec.file_size // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    res = run_cli("train", str(write_config(tmp_path / "half.yaml", config(run, tiny_data))), nproc=2, check=True)
    out = res.stdout
    assert "checkpoint step_00000006 has no manifest" in out
    assert "checkpoint step_00000006 is unusable: " in out
    assert f"{damaged}: record {rec.filename} is damaged (CRC-32 mismatch)" in out
    assert "falling back to step_00000004" in out and "resumed from step_00000004" in out
    got = losses(run)
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_resume_from_a_missing_tag_is_a_user_error(tmp_path, tiny_data, reference):
    ref_run, _, _ = reference
    cfg = write_config(tmp_path / "c.yaml", config(ref_run, tiny_data, resume_from="step_00000005"))
    res = run_cli("train", str(cfg))
    assert res.returncode == 2
    assert "error: train.resume_from: no checkpoint step_00000005" in res.stderr
    assert "step_00000002, step_00000004, step_00000006" in res.stderr


def test_failed_save_stops_every_rank_and_rerun_resumes(tmp_path, tiny_data, reference):
    _, ref, _ = reference
    run = tmp_path / "full_disk"
    cfg = write_config(tmp_path / "full_disk.yaml", config(run, tiny_data))
    res = run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": "save_enospc:4"})
    assert res.returncode != 0
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr  # one line, from rank 0; rank 1 (whose write failed) exits quietly
    line = lines[0]
    assert "saving checkpoint step_00000004 failed on rank 1" in line and "No space left on device" in line
    assert str(run / "checkpoints" / "step_00000004") in line and "latest_complete still names step_00000002" in line
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000002"

    res = run_cli("train", str(cfg), nproc=2, check=True)
    assert "resumed from step_00000002" in res.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def _rank_states(tag_dir, rank):
    """(fp32 master partition, Adam state) of one data-parallel rank in a ZeRO-2 checkpoint."""
    sd = torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
    o = sd["optimizer_state_dict"]
    return o["single_partition_of_fp32_groups"], o["base_optimizer_state"]["state"]


def _assert_unchanged(ckpt, before, after):
    a = torch.load(ckpt / before / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    b = torch.load(ckpt / after / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):
        (wa, sa), (wb, sb) = _rank_states(ckpt / before, rank), _rank_states(ckpt / after, rank)
        assert all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True)), rank
        for g in sa:
            for k in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[g][k], sb[g][k]), (rank, g, k)


SKIPS = "nan_loss:3,spike_loss:5"  # step 3: DeepSpeed's overflow path (fp32); step 5: the guard's own skip


def test_nan_and_spike_steps_are_skipped_and_resume_skips_the_same(tmp_path, tiny_data, reference):
    _, ref, _ = reference
    spike = {"spike_skip_sigma": 3.0, "spike_window": 4, "save_every": 1}
    run = tmp_path / "skips"
    cfg = write_config(tmp_path / "skips.yaml", config(run, tiny_data, **spike))
    res = run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": SKIPS}, check=True)
    assert "step 3 skipped (no optimizer update): loss is nan" in res.stdout
    assert "step 5 skipped (no optimizer update): loss spike" in res.stdout
    recs = {r["step"]: r for r in read_metrics(run)}
    assert [recs[s]["skipped_steps"] for s in range(1, STEPS + 1)] == [0, 0, 1, 1, 2, 2]
    assert recs[3]["loss"] is None and recs[2]["loss"] == pytest.approx(ref[2], rel=1e-5)
    # The schedule advances over a skip: the lr of every step is the uninterrupted run's.
    ref_lr = {r["step"]: r["lr"] for r in read_metrics(reference[0])}
    assert all(recs[s]["lr"] == pytest.approx(ref_lr[s]) for s in recs)
    ckpt = run / "checkpoints"
    _assert_unchanged(ckpt, "step_00000002", "step_00000003")
    _assert_unchanged(ckpt, "step_00000004", "step_00000005")
    # ... and a step that is not skipped does change them (the comparison can fail).
    with pytest.raises(AssertionError):
        _assert_unchanged(ckpt, "step_00000003", "step_00000004")

    # Crash after step 5 (checkpoint 4), re-run: the restored window makes step 5 a spike again.
    cut = tmp_path / "skips_cut"
    cfg = write_config(tmp_path / "skips_cut.yaml", config(cut, tiny_data, **spike))
    res = run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": SKIPS + ",crash_after_step:5"})
    assert res.returncode != 0
    res = run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": SKIPS}, check=True)
    assert "resumed from step_00000004" in res.stdout and "step 5 skipped" in res.stdout
    got = {r["step"]: r for r in read_metrics(cut)}
    assert sorted(got) == sorted(recs)
    for s, r in recs.items():
        assert got[s]["skipped_steps"] == r["skipped_steps"], s
        assert got[s]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6) if r["loss"] is not None \
            else got[s]["loss"] is None


def test_consecutive_skips_stop_the_run_and_keep_the_last_checkpoint(tmp_path, tiny_data):
    """ZeRO-3 and SLM: the selection refuses NaN losses; the step is skipped all the same."""
    from transformers import AutoModelForCausalLM

    from megaslm.model.presets import preset_config

    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(preset_config("tiny", 512)).save_pretrained(tmp_path / "ref")
    run = tmp_path / "nan_z3"
    c = config(run, tiny_data, zero="zero3", max_skipped_steps=2)
    c.update(objective="slm", reference={"path": str(tmp_path / "ref"), "placement": "replicated"})
    cfg = write_config(tmp_path / "nan_z3.yaml", c)
    res = run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": "nan_loss:3,nan_loss:4"})
    assert res.returncode != 0
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    assert "2 consecutive steps skipped (steps 3-4; last: loss is nan)" in lines[0]
    assert "train.max_skipped_steps=2" in lines[0] and "Resume point: step_00000002" in lines[0]
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000002"
    assert not (run / "checkpoints" / "step_00000004").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
