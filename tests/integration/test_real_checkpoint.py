"""A real checkpoint end to end: a tied-embedding byte-level BPE Llama in SmolLM2's layout (tiny dimensions, built
here), `model.init_from` it, SLM with a reference under ZeRO-2 and ZeRO-3, an exact resume, export, and reload
in transformers with the embeddings still tied and the engine's figures back."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_cli, write_config
from tests.integration.test_train import hf_valid_loss

pytestmark = pytest.mark.slow

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def smol(tmp_path_factory, tiny_data):
    """{base, reference, train, valid}: a SmolLM2-layout base (LlamaForCausalLM, tied head, GQA, BPE tokenizer in
    tokenizer.json), a reference (the base, perturbed), and shards made with its tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megaslm.data.prepare import prepare

    root = tmp_path_factory.mktemp("smol")
    texts = [json.loads(x)["text"] for x in open(tiny_data["train_text"])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      rope_theta=100000.0)
    torch.manual_seed(0)
    for name, noise in (("base", 0.0), ("reference", 0.02)):
        model = LlamaForCausalLM(cfg)
        if noise:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * torch.randn_like(p))
        torch.manual_seed(0)  # the base and the reference differ by the noise only
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prepare([tiny_data["train_text"]], str(root / "base"), str(root / "train"))
    valid = [json.loads(x)["text"] for x in open(tiny_data["root"] / "valid.jsonl")]
    (root / "valid.txt").write_text("\n\n".join(valid[:40]))
    prepare([str(root / "valid.txt")], str(root / "base"), str(root / "valid"))
    return {k: str(root / k) for k in ("base", "reference", "train", "valid")}


def smol_config(run_dir, smol, zero):
    return {"run": {"dir": str(run_dir)}, "model": {"init_from": smol["base"]},
            "data": {"train": smol["train"], "valid": smol["valid"], "valid_sequences": 4},
            "train": {"steps": 4, "seq_len": 32, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1, "seed": 7,
                      "save_every": 2},
            "deepspeed": {"config": f"ds_configs/{zero}.json"}, "wandb": {"mode": "disabled"},
            "objective": "slm", "slm": {"ratio": 0.6, "scope": "global"},
            "reference": {"path": smol["reference"], "placement": "auto"}}


def test_tied_bpe_checkpoint_trains_resumes_and_exports_under_zero2_and_zero3(tmp_path, smol):
    runs = {}
    for zero in ("zero2", "zero3"):
        runs[zero] = tmp_path / zero
        run_cli("train", str(write_config(tmp_path / f"{zero}.yaml", smol_config(runs[zero], smol, zero))),
                nproc=2, check=True)
    full = {z: read_metrics(r) for z, r in runs.items()}
    for z, recs in full.items():
        assert [r["step"] for r in recs] == [1, 2, 3, 4], z
        assert all(r["n_selected"] == 77 for r in recs), z  # ceil(0.6 * 2 ranks x 2 x 32 labels)
    # The same init, data and reference: ZeRO-2 and ZeRO-3 take the same steps.
    for a, b in zip(full["zero2"], full["zero3"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]

    # ZeRO-3 crash after step 3 (checkpoint at 2), then the same command again: the losses of the uninterrupted run.
    cut = tmp_path / "cut"
    cfg = write_config(tmp_path / "cut.yaml", smol_config(cut, smol, "zero3"))
    assert run_cli("train", str(cfg), nproc=2, env={"MEGASLM_FAULT": "crash_after_step:3"}).returncode != 0
    res = run_cli("train", str(cfg), nproc=2, check=True)
    assert "resumed from step_00000002" in res.stdout
    for got, want in zip(read_metrics(cut), full["zero3"]):
        for key in ("loss", "loss_selected", "ref_loss", "threshold"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), (got["step"], key)

    # Export the resumed ZeRO-3 run: transformers reloads it with the head still tied to the embeddings, its
    # validation loss is the engine's, and its logits are the run's checkpoint's (loaded by megaslm).
    from transformers import AutoModelForCausalLM

    from megaslm.analyze.scoring import load_scorer

    out = tmp_path / "hf"
    run_cli("export", str(cut), "--out", str(out), check=True)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(smol["base"])
    assert not torch.equal(hf.model.embed_tokens.weight, base.model.embed_tokens.weight)  # it trained
    engine_val = read_metrics(cut)[-1]["val_loss"]
    assert hf_valid_loss(out, {"valid": smol["valid"]}, n_seq=4) == pytest.approx(engine_val, rel=1e-4)
    ids = torch.tensor([list(range(3, 35))])
    run_model = load_scorer(str(cut), torch.device("cpu")).model.lm.eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, run_model(input_ids=ids).logits, atol=1e-5)
