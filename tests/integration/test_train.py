"""Real multi-process DeepSpeed runs (2 gloo ranks): ZeRO-2 and ZeRO-3 training, crash + resume, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow


def config(run_dir, data, zero="zero2", **train):
    t = {"steps": 6, "seq_len": 32, "micro_batch_size": 2, "save_every": 3, "eval_every": 3, "lr": 2e-3,
         "warmup_steps": 2, "seed": 3}
    t.update(train)
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": data["train"], "valid": data["valid"], "tokenizer": data["tok"],
                     "valid_sequences": 8},
            "train": t, "deepspeed": {"config": f"ds_configs/{zero}.json"}, "wandb": {"mode": "offline"}}


def hf_valid_loss(model_dir, data, seq_len=32, n_seq=8):
    """Mean CE of an exported model over the validation sequences, with transformers' full logits."""
    from transformers import AutoModelForCausalLM

    from megaslm.data.loader import PackedLoader

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in PackedLoader(data["valid"], seq_len, n_seq, dp_rank=0, dp_size=1).eval_batches(n_seq):
            logits = model(input_ids=b["input_ids"]).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="sum", ignore_index=-100)
            total += ce.item()
            count += int((b["labels"] != -100).sum())
    return total / count


def test_zero2_resume_reproduces_uninterrupted_run_and_export_loads(tmp_path, tiny_data):
    full = tmp_path / "full"
    res = run_cli("train", str(write_config(tmp_path / "full.yaml", config(full, tiny_data))), nproc=2, check=True)
    ref = {r["step"]: r for r in read_metrics(full)}
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 for r in ref.values())
    assert ref[6]["loss"] < ref[1]["loss"]
    assert ref[3]["val_loss"] is not None and ref[6]["val_loss"] < ref[3]["val_loss"]
    info = json.loads((full / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["dp_size"] == 2 and info["zero_stage"] == 2
    assert (full / "config.yaml").is_file()
    assert list((full / "wandb").glob("offline-run-*")), "wandb offline run missing"

    # Crash after step 5 (checkpoint at 3), then re-run the same command: it resumes from step 3.
    cut = tmp_path / "cut"
    cfg_path = write_config(tmp_path / "cut.yaml", config(cut, tiny_data))
    res = run_cli("train", str(cfg_path), nproc=2, env={"MEGASLM_FAULT": "crash_after_step:5"})
    assert res.returncode != 0
    assert (cut / "checkpoints" / "latest_complete").read_text() == "step_00000003"
    res = run_cli("train", str(cfg_path), nproc=2, check=True)
    assert "resumed from step_00000003" in res.stdout
    got = read_metrics(cut)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # one record per step: the crashed attempt's are dropped
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5, abs=1e-6), r["step"]
    assert got[-1]["val_loss"] == pytest.approx(ref[6]["val_loss"], rel=1e-5)
    # Both attempts logged to the same wandb run: the offline run directories carry the stored id.
    run_id = (cut / "wandb_id").read_text().strip()
    attempts = sorted((cut / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(d.name.endswith(f"-{run_id}") for d in attempts), attempts

    # Export, reload with plain transformers, and get the run's own validation loss back.
    out = tmp_path / "hf"
    res = run_cli("export", str(full), "--out", str(out), check=True)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok("the derivative of a polynomial")["input_ids"]) > 0
    assert hf_valid_loss(out, tiny_data) == pytest.approx(ref[6]["val_loss"], rel=1e-4)


def test_zero3_crash_while_saving_keeps_last_good_checkpoint(tmp_path, tiny_data):
    run = tmp_path / "z3"
    cfg_path = write_config(tmp_path / "z3.yaml", config(run, tiny_data, zero="zero3", steps=4, save_every=2,
                                                          eval_every=2))
    res = run_cli("train", str(cfg_path), nproc=2, env={"MEGASLM_FAULT": "crash_in_save:4"})
    assert res.returncode != 0
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000002"
    res = run_cli("train", str(cfg_path), nproc=2, check=True)
    assert "resumed from step_00000002" in res.stdout
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert json.loads((run / "run_info.json").read_text())["zero_stage"] == 3
    out = tmp_path / "hf3"
    run_cli("export", str(run), "--out", str(out), check=True)
    assert hf_valid_loss(out, tiny_data) == pytest.approx(recs[-1]["val_loss"], rel=1e-4)
