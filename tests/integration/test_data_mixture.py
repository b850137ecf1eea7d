"""Real 2-rank runs on a mixture (clean text + masked SFT pairs, document masking, named validation sets):
crash + resume gives the same losses; metrics agree with an independent replay of the loader. And the
gradient-accumulation test on masked SFT data (token-weighted normalization across micro-steps)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft(tiny_data, tmp_path_factory):
    """Prompt/response pairs cut from the real corpus: the first sentence is the prompt, the rest the response."""
    from megaslm.data.prepare import prepare

    root = tmp_path_factory.mktemp("sft")
    lines = (tiny_data["root"] / "train.jsonl").read_text().splitlines()
    pairs = []
    for line in lines:
        text = json.loads(line)["text"]
        head, sep, tail = text.partition(". ")
        if sep and tail.strip():
            pairs.append({"prompt": head[:150] + ".", "response": tail[:200]})
    for name, part in (("train", pairs[:1]), ("valid", pairs[12:20]), ("big", pairs[:80])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in part))
        prepare([str(root / f"{name}.jsonl")], tiny_data["tok"], str(root / name),
                sft_fields={"prompt": "prompt", "response": "response"})
    return {n: str(root / n) for n in ("train", "valid", "big")}


def mixture_config(run_dir, tiny_data, sft):
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": [{"path": tiny_data["train"], "weight": 2, "name": "clean"},
                               {"path": sft["train"], "weight": 2, "name": "sft"}],
                     "valid": {"clean": tiny_data["valid"], "sft": sft["valid"]},
                     "document_mask": True, "valid_sequences": 8, "tokenizer": tiny_data["tok"]},
            "train": {"steps": 6, "seq_len": 32, "micro_batch_size": 2, "save_every": 3, "eval_every": 3,
                      "lr": 2e-3, "warmup_steps": 2, "seed": 5},
            "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"}}


def replay(tiny_data, sft, steps):
    """Per step: labelled tokens of each component and its epochs, from a one-rank loader with the whole batch."""
    from megaslm.data.mixture import Component, MixtureLoader
    from megaslm.data.shards import ShardSet

    comps = [Component("clean", ShardSet(tiny_data["train"]), 2.0), Component("sft", ShardSet(sft["train"]), 2.0)]
    loader = MixtureLoader(comps, 32, 4, seed=5, document_mask=True)
    out = []
    for _ in range(steps):
        b = loader.next_batch()
        valid = b["labels"] != -100
        out.append({"clean": int(valid[b["component"] == 0].sum()), "sft": int(valid[b["component"] == 1].sum()),
                    "rows": b["component"].tolist(), "epochs": list(loader.epochs)})
    return out


def test_mixture_run_resumes_exactly_and_logs_per_component_metrics(tmp_path, tiny_data, sft):
    full = tmp_path / "full"
    run_cli("train", str(write_config(tmp_path / "full.yaml", mixture_config(full, tiny_data, sft))), nproc=2,
            check=True)
    ref = {r["step"]: r for r in read_metrics(full)}
    want = replay(tiny_data, sft, 6)
    for step, w in enumerate(want, 1):
        r = ref[step]
        assert sorted(w["rows"]) == [0, 0, 1, 1]  # weights 2:2 over a global micro-batch of 4
        assert r["tokens/clean"] == w["clean"] and r["tokens/sft"] == w["sft"]
        assert r["n_valid"] == w["clean"] + w["sft"]
        assert (r["epoch/clean"], r["epoch/sft"]) == tuple(w["epochs"])
    assert want[-1]["epochs"][1] >= 1, "the small SFT component should have started a second epoch"
    for step in (3, 6):
        assert ref[step]["val_loss"] == ref[step]["val_loss/clean"]
        assert ref[step]["val_loss/sft"] > 0 and ref[step]["val_loss/sft"] != ref[step]["val_loss/clean"]

    cut = tmp_path / "cut"
    cfg_path = write_config(tmp_path / "cut.yaml", mixture_config(cut, tiny_data, sft))
    res = run_cli("train", str(cfg_path), nproc=2, env={"MEGASLM_FAULT": "crash_after_step:5"})
    assert res.returncode != 0
    res = run_cli("train", str(cfg_path), nproc=2, check=True)
    assert "resumed from step_00000003" in res.stdout
    got = read_metrics(cut)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for r in got:
        for key in ("loss", "n_valid", "tokens/sft", "epoch/sft"):
            assert r[key] == pytest.approx(ref[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)
    assert got[-1]["val_loss/sft"] == pytest.approx(ref[6]["val_loss/sft"], rel=1e-5)


def accum_config(run_dir, tiny_data, sft, micro, accum):
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": sft["big"], "tokenizer": tiny_data["tok"]},
            "train": {"steps": 2, "seq_len": 32, "micro_batch_size": micro, "grad_accum": accum, "lr": 2e-3,
                      "warmup_steps": 0, "seed": 7, "grad_clip": 0.0},
            "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"}}


def test_grad_accum_2_equals_one_micro_batch_of_twice_the_size_with_masked_sft_data(tmp_path, tiny_data, sft):
    """Micro-steps of masked data hold different token counts; the step's gradient must be the gradient of the
    mean over all of the step's labelled tokens (token-weighted, not a mean of micro-step means). Needs the
    objective's token-weighted normalization (branch `objectives`)."""
    from megaslm.data.loader import PackedLoader

    loader = PackedLoader(sft["big"], 32, 4, seed=7)
    counts = [int((loader.next_batch()["labels"] != -100).sum()) for _ in range(2)]
    assert counts[0] != counts[1], "the test needs micro-steps with different labelled-token counts"
    recs = {}
    for name, micro, accum in (("accum", 4, 2), ("big", 8, 1)):
        run = tmp_path / name
        run_cli("train", str(write_config(tmp_path / f"{name}.yaml", accum_config(run, tiny_data, sft, micro, accum))),
                check=True)
        recs[name] = read_metrics(run)
    a, b = recs["accum"], recs["big"]
    assert a[0]["n_valid"] == b[0]["n_valid"] == sum(counts)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-4)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)


def test_slm_on_a_mixture_with_document_masking_scores_the_reference_with_the_same_mask(tmp_path, tiny_data, sft):
    """One process: the online reference sees the same position_ids and masked labels as the trained model
    (its mean loss equals an independent run of the reference on the replayed batch); per-component and
    per-file SLM metrics under their names."""
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.build import TokenLossModel
    from megaslm.model.presets import preset_config

    torch.manual_seed(11)
    ref_dir = tmp_path / "ref"
    AutoModelForCausalLM.from_config(preset_config("tiny", 512)).save_pretrained(ref_dir)
    load_tokenizer(tiny_data["tok"]).save_pretrained(str(ref_dir))
    cfg = mixture_config(tmp_path / "slm", tiny_data, sft)
    cfg["data"].update(track_sources=True, valid=None)
    cfg["data"]["train"][1]["path"] = sft["big"]  # enough responses that both sft rows hold labelled tokens
    cfg["train"].update(steps=1, micro_batch_size=4, save_every=0, eval_every=0)
    cfg.update(objective="slm", slm={"ratio": 0.5, "scope": "global"},
               reference={"path": str(ref_dir), "placement": "replicated"})
    run_cli("train", str(write_config(tmp_path / "slm.yaml", cfg)), check=True)
    rec = read_metrics(tmp_path / "slm")[0]

    from megaslm.data.mixture import Component, MixtureLoader
    from megaslm.data.shards import ShardSet

    b = MixtureLoader([Component("clean", ShardSet(tiny_data["train"]), 2.0),
                       Component("sft", ShardSet(sft["big"]), 2.0)], 32, 4, seed=5, document_mask=True).next_batch()
    ref = TokenLossModel(AutoModelForCausalLM.from_pretrained(ref_dir)).eval()
    with torch.no_grad():
        losses = ref(b["input_ids"], b["labels"], b["position_ids"]).double()
    valid = b["labels"] != -100
    assert int(valid[b["component"] == 1].sum()) > 0
    assert rec["n_valid"] == int(valid.sum())
    assert rec["ref_loss"] == pytest.approx(float(losses[valid].mean()), rel=1e-5)
    assert rec["tokens/clean"] == rec["tokens/clean/0"] == int(valid[b["component"] == 0].sum())
    assert rec["tokens/sft"] == rec["tokens/sft/0"] == int(valid[b["component"] == 1].sum())
    for name in ("clean", "sft"):
        assert 0 <= rec[f"selected_frac/{name}"] <= 1
    n_sel = rec["selected_frac/clean"] * rec["tokens/clean"] + rec["selected_frac/sft"] * rec["tokens/sft"]
    assert n_sel == pytest.approx(rec["n_selected"])
