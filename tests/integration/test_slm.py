"""SLM runs with a co-located reference model (a second DeepSpeed engine in the same processes)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, tiny_data):
    """A reference model directory as `megaslm export` writes it: HF weights + config + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    out = tmp_path_factory.mktemp("ref")
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", 512))
    model.save_pretrained(out / "good")
    load_tokenizer(tiny_data["tok"]).save_pretrained(str(out / "good"))
    AutoModelForCausalLM.from_config(preset_config("tiny", 600)).save_pretrained(out / "bad_vocab")
    other = AutoModelForCausalLM.from_config(preset_config("tiny", 512))
    other.save_pretrained(out / "bad_tok")
    load_tokenizer(str(tiny_data["root"] / "tok_other")).save_pretrained(str(out / "bad_tok"))
    return out


def slm_config(run_dir, data, ref, zero="zero2", placement="replicated", mb=2, **train):
    t = {"steps": 3, "seq_len": 32, "micro_batch_size": mb, "lr": 2e-3, "warmup_steps": 1, "seed": 5}
    t.update(train)
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"}, "data": {"train": data["train"]},
            "train": t, "deepspeed": {"config": f"ds_configs/{zero}.json"}, "wandb": {"mode": "disabled"},
            "objective": "slm", "slm": {"ratio": 0.6, "scope": "global"},
            "reference": {"path": str(ref), "placement": placement}}


def test_slm_global_selection_is_exact_across_data_parallel_ranks(tmp_path, tiny_data, reference_dir):
    """DP=2 x micro-batch 2 and DP=1 x micro-batch 4 see the same global batches: same selection, same losses."""
    ref = reference_dir / "good"
    two = tmp_path / "dp2"
    run_cli("train", str(write_config(tmp_path / "a.yaml", slm_config(two, tiny_data, ref, mb=2))), nproc=2,
            check=True)
    one = tmp_path / "dp1"
    run_cli("train", str(write_config(tmp_path / "b.yaml", slm_config(one, tiny_data, ref, mb=4))), check=True)
    a, b = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_selected", "loss_all", "loss_unselected", "ref_loss", "selected_frac",
                    "threshold", "n_selected"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    n_valid = 2 * 2 * 32
    for r in a:
        assert r["n_selected"] == 77  # ceil(0.6 * 128)
        assert r["selected_frac"] == pytest.approx(77 / n_valid)
        assert r["loss_selected"] > r["loss_all"] > r["loss_unselected"]
        assert r["loss"] == pytest.approx(r["loss_selected"])
        assert r["selected_tokens_per_s"] > 0
    assert json.loads((two / "run_info.json").read_text())["reference_placement"] == "replicated"
    # The achieved-FLOPs metric counts the reference forward as `megaslm plan` does (2N + 4LHT per token).
    from megaslm.model.describe import describe
    from megaslm.model.presets import preset_config

    d = describe(preset_config("tiny", 512))
    per_token = d.train_flops_per_token(32) + d.forward_flops_per_token(32)
    for r in a:
        assert r["tflops_per_device"] == pytest.approx(per_token * r["tokens_per_s"] / 2 / 1e12, rel=1e-9)

    # Rho-1 step 2 as its own job: score the corpus once, then train from the cache: the same run, step for step.
    cache = tmp_path / "ref_cache"
    cfg = slm_config(tmp_path / "cached", tiny_data, ref, mb=2)
    cfg["reference"]["cache"] = str(cache)
    cfg_path = write_config(tmp_path / "cached.yaml", cfg)
    run_cli("score", str(cfg_path), "--storage-dtype", "float32", nproc=2, check=True)  # exact comparison
    assert (cache / "meta.json").is_file()
    run_cli("train", str(cfg_path), nproc=2, check=True)
    assert json.loads((tmp_path / "cached" / "run_info.json").read_text())["reference_placement"] == "cache"
    for ra, rc in zip(a, read_metrics(tmp_path / "cached")):
        for key in ("loss", "ref_loss", "threshold", "n_selected", "loss_unselected"):
            assert rc[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
        # no reference forward per token with a cache
        assert rc["tflops_per_device"] == pytest.approx(d.train_flops_per_token(32) * rc["tokens_per_s"] / 2 / 1e12,
                                                        rel=1e-9)


def test_slm_zero3_with_partitioned_reference(tmp_path, tiny_data, reference_dir):
    run = tmp_path / "z3"
    cfg = slm_config(run, tiny_data, reference_dir / "good", zero="zero3", placement="zero3", steps=2)
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)), nproc=2, check=True)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(0 < r["selected_frac"] <= 0.61 for r in recs)
    info = json.loads((run / "run_info.json").read_text())
    assert info["zero_stage"] == 3 and info["reference_placement"] == "zero3"
    assert "sel 0.60" in res.stdout


@pytest.mark.parametrize("which, needles", [("bad_vocab", ["vocab_size 600", "512"]),
                                            ("bad_tok", ["tokenizer sha256"])])
def test_reference_with_another_tokenizer_is_refused(tmp_path, tiny_data, reference_dir, which, needles):
    cfg = slm_config(tmp_path / "r", tiny_data, reference_dir / which)
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", cfg)))
    assert res.returncode == 2, res.stderr[-3000:]
    err = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and all(n in err[0] for n in needles), res.stderr[-3000:]


def test_init_from_local_checkpoint_under_zero3(tmp_path, tiny_data, reference_dir):
    """model.init_from loads a Hugging Face directory partitioned (ZeRO-3) and starts from its weights."""
    from tests.integration.test_train import hf_valid_loss

    run = tmp_path / "init"
    cfg = {"run": {"dir": str(run)}, "model": {"init_from": str(reference_dir / "good")},
           "data": {"train": tiny_data["train"], "valid": tiny_data["valid"], "valid_sequences": 8},
           "train": {"steps": 1, "seq_len": 32, "micro_batch_size": 2, "lr": 1e-9, "warmup_steps": 0},
           "deepspeed": {"config": "ds_configs/zero3.json"}, "wandb": {"mode": "disabled"}}
    run_cli("train", str(write_config(tmp_path / "i.yaml", cfg)), nproc=2, check=True)
    (rec,) = read_metrics(run)
    # One step at lr 1e-9 leaves the weights as loaded: the run's validation loss is the checkpoint's own.
    assert rec["val_loss"] == pytest.approx(hf_valid_loss(reference_dir / "good", tiny_data), rel=1e-4)


def test_slm_zero3_offload_with_offloaded_reference(tmp_path, tiny_data, reference_dir):
    """ZeRO-3 with optimizer + parameter offload (DeepSpeedCPUAdam), reference partitioned and offloaded."""
    run = tmp_path / "off"
    cfg = slm_config(run, tiny_data, reference_dir / "good", zero="zero3_offload", placement="zero3_offload",
                     steps=2)
    run_cli("train", str(write_config(tmp_path / "o.yaml", cfg)), nproc=2, check=True, timeout=900)
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2] and all(r["n_selected"] == 77 for r in recs)
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert json.loads((run / "run_info.json").read_text())["reference_placement"] == "zero3_offload"
