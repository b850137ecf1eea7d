"""Tensor parallelism (parallel.tensor = 2) on DeepSpeed AutoTP: same training as data parallelism, resume, export.

The runs use a 515-token vocabulary so the LM-head rows split unevenly (258 / 257) over 2 tensor-parallel ranks,
for the trained model and for the co-located reference alike. Every layout sees the same global batch of 8
sequences: (DP=2, TP=1) x micro-batch 4, (DP=1, TP=2) x 8, (DP=2, TP=2) x 4.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megaslm.errors import UserError
from megaslm.parallel import tensor as tp
from tests.conftest import read_metrics, run_cli, write_config

VOCAB = 515
SAME_KEYS = ("loss", "loss_all", "loss_selected", "loss_unselected", "ref_loss", "selected_frac", "threshold",
             "n_selected", "n_valid", "grad_norm", "lr")


# ---- no processes: checks and shard merging --------------------------------------------------------------------

def test_setup_errors_name_the_setting():
    from megaslm.model.presets import preset_config

    with pytest.raises(UserError, match=r"parallel.tensor=3 does not divide the world size 4"):
        tp.check_parallel_setup(3, 4, 2, "deepspeed.config x", "y")
    with pytest.raises(UserError, match=r"deepspeed.config ds_configs/zero3.json uses ZeRO stage 3.*parallel.tensor=2"):
        tp.check_parallel_setup(2, 4, 3, "deepspeed.config ds_configs/zero3.json", "use ZeRO-2")
    tp.check_parallel_setup(2, 4, 2, "deepspeed.config x", "y")
    tp.check_parallel_setup(1, 3, 3, "deepspeed.config x", "y")  # no tensor parallelism: ZeRO-3 is fine

    cfg = preset_config("tiny", VOCAB)  # 4 attention heads, 4 key-value heads
    tp.check_model_config(cfg, 4, "model tiny")
    with pytest.raises(UserError, match=r"parallel.tensor=8 must divide the key-value head count.*=4"):
        tp.check_model_config(cfg, 8, "model tiny")
    with pytest.raises(UserError, match=r"parallel.tensor=3 must divide"):
        tp.check_model_config(cfg, 3, "model tiny")
    small = preset_config("tiny", 2)
    small.num_key_value_heads = small.num_attention_heads = 4
    with pytest.raises(UserError, match=r"parallel.tensor=4 is larger than the vocabulary of model tiny \(2 tokens\)"):
        tp.check_model_config(small, 4, "model tiny")


def test_merge_tp_shards_inverts_uneven_splits_and_restores_tied_names():
    g = torch.Generator().manual_seed(0)
    full = {"head.weight": torch.randn(VOCAB, 6, generator=g), "proj.weight": torch.randn(4, 7, generator=g),
            "norm.weight": torch.randn(6, generator=g)}
    layout = {"tp_size": 2, "tied": {"embed.weight": "head.weight"},
              "params": {"head.weight": {"dim": 0, "sizes": [258, 257]}, "proj.weight": {"dim": 1, "sizes": [4, 3]}}}
    shards = [tp.shard(full, layout, r) for r in range(2)]
    assert shards[1]["head.weight"].shape == (257, 6) and shards[1]["proj.weight"].shape == (4, 3)
    assert torch.equal(shards[1]["head.weight"], full["head.weight"][258:])  # contiguous, like torch.tensor_split
    shards[0]["embed.weight"] = shards[0]["head.weight"]  # DeepSpeed records the alias on one rank only
    merged = tp.merge_tp_shards(shards, layout)
    assert set(merged) == set(full) | {"embed.weight"}
    for k, v in full.items():
        assert torch.equal(merged[k], v), k
    assert torch.equal(merged["embed.weight"], full["head.weight"])

    bad = [dict(s) for s in shards]
    bad[1]["norm.weight"] = bad[1]["norm.weight"] + 1e-3
    with pytest.raises(ValueError, match="replicated parameter norm.weight differs"):
        tp.merge_tp_shards(bad, layout)
    with pytest.raises(ValueError, match="head.weight on rank 0 has 258 along dim 0, layout says 257"):
        tp.merge_tp_shards(shards, {**layout, "params": {**layout["params"],
                                                         "head.weight": {"dim": 0, "sizes": [257, 258]}}})


def _layout_worker(rank, world):
    """Shard a tiny Llama by hand (head rows, q_proj rows, o_proj columns) and read the layout back."""
    from transformers import AutoModelForCausalLM

    from megaslm.model.presets import preset_config

    cfg = preset_config("tiny", VOCAB)
    lm = AutoModelForCausalLM.from_config(cfg)
    attn = lm.model.layers[1].self_attn
    for mod, dim in ((lm.lm_head, 0), (attn.q_proj, 0), (attn.o_proj, 1)):
        mod.weight = torch.nn.Parameter(torch.tensor_split(mod.weight.detach(), world, dim=dim)[rank].clone())
    layout = tp.capture_layout(lm, cfg, torch.distributed.group.WORLD)
    assert layout == {"tp_size": 2, "tied": {}, "params": {
        "lm_head.weight": {"dim": 0, "sizes": [258, 257]},
        "model.layers.1.self_attn.q_proj.weight": {"dim": 0, "sizes": [64, 64]},
        "model.layers.1.self_attn.o_proj.weight": {"dim": 1, "sizes": [64, 64]}}}, layout
    tp.check_vocab_head(lm, layout, torch.distributed.group.WORLD)


@pytest.mark.slow
def test_capture_layout_over_two_ranks():
    from tests.distributed._spawn import run_gloo

    run_gloo(_layout_worker, 2)


# ---- real runs ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_data(tmp_path_factory, tiny_data):
    """Shards tokenized with a 515-piece tokenizer, and a reference model directory for it."""
    from transformers import AutoModelForCausalLM

    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import load_tokenizer, train_tokenizer
    from megaslm.model.presets import preset_config

    root = tmp_path_factory.mktemp("tp_data")
    tok = train_tokenizer([tiny_data["train_text"]], VOCAB, str(root / "tok"))
    prepare([tiny_data["train_text"]], tok, str(root / "train"))
    prepare([str(tiny_data["root"] / "valid.jsonl")], tok, str(root / "valid"))
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(preset_config("tiny", VOCAB)).save_pretrained(root / "ref")
    load_tokenizer(tok).save_pretrained(str(root / "ref"))
    return {"root": root, "tok": tok, "train": str(root / "train"), "valid": str(root / "valid"),
            "ref": str(root / "ref")}


def tp_config(run_dir, data, mb, tensor):
    return {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
            "data": {"train": data["train"], "valid": data["valid"], "tokenizer": data["tok"], "valid_sequences": 8},
            "train": {"steps": 4, "seq_len": 32, "micro_batch_size": mb, "lr": 2e-3, "warmup_steps": 1, "seed": 5,
                      "save_every": 2, "eval_every": 0},
            "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"},
            "objective": "slm", "slm": {"ratio": 0.6, "scope": "global"},
            "reference": {"path": data["ref"], "placement": "replicated"}, "parallel": {"tensor": tensor}}


def exported_weights(run_dir, out):
    from safetensors.torch import load_file

    from megaslm.export import export

    return load_file(export(str(run_dir), str(out)) / "model.safetensors")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, odd_data):
    """(DP=2, TP=1): 2 ranks x micro-batch 4, ZeRO-2, co-located reference."""
    tmp = tmp_path_factory.mktemp("tp_base")
    run = tmp / "run"
    run_cli("train", str(write_config(tmp / "c.yaml", tp_config(run, odd_data, 4, 1))), nproc=2, check=True)
    assert not (run / tp.LAYOUT_FILE).exists()
    return {"metrics": read_metrics(run), "weights": exported_weights(run, tmp / "hf"),
            "info": json.loads((run / "run_info.json").read_text())}


def assert_same_run(got: list[dict], want: list[dict]):
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for k in SAME_KEYS:
            # The threshold is one token's loss minus its reference loss, both near 6 in float32 (ulp 4.8e-7),
            # from logits the two layouts sum in another order: its noise is absolute, not relative to its small
            # value. A wrong selection moves it by ~1e-2 and moves n_selected and the loss splits with it.
            tol = {"abs": 5e-6} if k == "threshold" else {"rel": 1e-5, "abs": 1e-7}
            assert a[k] == pytest.approx(b[k], **tol), (a["step"], k)
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)


def assert_same_weights(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        # Adam turns summation-order noise in near-zero gradients into small update differences; a wrong
        # gradient moves a weight by about lr = 2e-3 per step.
        assert (got[k] - want[k]).abs().max() < 1e-4, k


@pytest.mark.slow
def test_tp2_trains_like_dp2(tmp_path, odd_data, baseline):
    """(DP=1, TP=2) x micro-batch 8: same losses, selection, grad norm and updated weights as (DP=2, TP=1) x 4."""
    run = tmp_path / "tp2"
    run_cli("train", str(write_config(tmp_path / "c.yaml", tp_config(run, odd_data, 8, 2))), nproc=2, check=True)
    assert_same_run(read_metrics(run), baseline["metrics"])

    info = json.loads((run / "run_info.json").read_text())
    assert (info["tp_size"], info["dp_size"]) == (2, 1)
    assert info["model"]["params"] == baseline["info"]["model"]["params"]  # the full count, not one shard's
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["tensor_parallel"]["autotp_size"] == 2
    # Blocks and head are sharded; embeddings and norms are not.
    layout = json.loads((run / tp.LAYOUT_FILE).read_text())
    p = layout["params"]
    assert p["lm_head.weight"] == {"dim": 0, "sizes": [258, 257]}
    for i in range(4):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            assert p[f"model.layers.{i}.{name}.weight"] == {"dim": 0, "sizes": [64, 64]}
        assert p[f"model.layers.{i}.self_attn.o_proj.weight"] == {"dim": 1, "sizes": [64, 64]}
        assert p[f"model.layers.{i}.mlp.gate_proj.weight"] == {"dim": 0, "sizes": [172, 172]}
        assert p[f"model.layers.{i}.mlp.down_proj.weight"] == {"dim": 1, "sizes": [172, 172]}
    assert not any("norm" in k or "embed" in k for k in p)
    tag = run / "checkpoints" / "step_00000004"
    assert [len(tp.tp_rank_files(tag, r)) for r in range(2)] == [2, 2]  # model + optimizer states per TP rank

    assert_same_weights(exported_weights(run, tmp_path / "hf"), baseline["weights"])
    # Its step-2 checkpoint resumes in one process without tensor parallelism (DeepSpeed's universal checkpoint)
    # and finishes like the (DP=2, TP=1) run.
    cut = tmp_path / "tp1"
    shutil.copytree(run, cut, ignore=shutil.ignore_patterns("lease.json"))
    cfg = tp_config(cut, odd_data, 8, 1)
    cfg["train"]["resume_from"] = "step_00000002"
    res = run_cli("train", str(write_config(tmp_path / "tp1.yaml", cfg)), check=True)
    assert "tensor-parallel 2, ZeRO-2; this launch has 1 data-parallel rank, ZeRO-2: loading it as" in res.stdout
    assert_same_run(read_metrics(cut), baseline["metrics"])
    assert not (cut / tp.LAYOUT_FILE).exists()  # export reads this run as unsplit now


@pytest.mark.slow
def test_dp2_tp2_slm_resumes_and_exports(tmp_path, odd_data, baseline):
    """4 processes (DP=2, TP=2), ZeRO-2, co-located reference: crash after step 3, resume from the step-2
    checkpoint, finish like the (DP=2, TP=1) run; the export loads in transformers with the run's val loss."""
    from tests.integration.test_train import hf_valid_loss

    run = tmp_path / "dp2tp2"
    cfg = write_config(tmp_path / "c.yaml", tp_config(run, odd_data, 4, 2))
    res = run_cli("train", str(cfg), nproc=4, env={"MEGASLM_FAULT": "crash_after_step:3"})
    assert res.returncode != 0
    assert (run / "checkpoints" / "latest_complete").read_text() == "step_00000002"
    res = run_cli("train", str(cfg), nproc=4, check=True)
    assert "resumed from step_00000002" in res.stdout and "dp 2 x tp 2" in res.stdout
    recs = read_metrics(run)
    assert_same_run(recs, baseline["metrics"])

    weights = exported_weights(run, tmp_path / "hf")
    assert_same_weights(weights, baseline["weights"])
    data = {"valid": odd_data["valid"]}
    assert hf_valid_loss(tmp_path / "hf", data) == pytest.approx(recs[-1]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_tensor_size_must_divide_world(tmp_path, odd_data):
    res = run_cli("train", str(write_config(tmp_path / "c.yaml", tp_config(tmp_path / "r", odd_data, 4, 2))))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: parallel.tensor=2 does not divide the world size 1" in res.stderr
