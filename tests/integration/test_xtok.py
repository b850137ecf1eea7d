"""A reference with another tokenizer: online, in `megaslm score`, and imported from another engine's log-probs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from megaslm.config import load_config
from megaslm.errors import UserError
from megaslm.reference.imported import import_logprobs
from tests.conftest import REPO, read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow
SEQ = 32


@pytest.fixture(scope="module")
def xref(tmp_path_factory, byte_level_bpe):
    """A tiny reference model of a byte-level BPE tokenizer (vocabulary 700; the trained shards have 512)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    tok = load_tokenizer(byte_level_bpe)
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("xref")
    AutoModelForCausalLM.from_config(preset_config("tiny", tok.vocab_size, eos_id=tok.eos_id)).save_pretrained(out)
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data):
    """Shards of the first 40 held-out documents (a cheap corpus to score three ways)."""
    from megaslm.data.prepare import prepare

    root = tmp_path_factory.mktemp("small")
    lines = open(tiny_data["root"] / "valid.jsonl").read().splitlines()[:40]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    prepare([str(root / "docs.jsonl")], str(tiny_data["tok"]), str(root / "train"))
    return {**tiny_data, "valid": str(root / "train"), "train": str(root / "train")}


def _config(tmp_path, tiny_data, ref, **over):
    cfg = {"run": {"dir": str(tmp_path / "run")}, "model": {"preset": "tiny"},
           "data": {"train": tiny_data["valid"], "tokenizer": str(tiny_data["tok"])},
           "train": {"steps": 2, "seq_len": SEQ, "micro_batch_size": 8, "lr": 1e-3, "warmup_steps": 1},
           "deepspeed": {"config": "ds_configs/zero1.json"}, "wandb": {"mode": "disabled"}, "objective": "slm",
           "slm": {"ratio": 0.6, "scope": "global"}, "reference": {"path": ref, "placement": "replicated"}}
    for k, v in over.items():
        a, b = k.split(".")
        cfg[a][b] = v
    return write_config(tmp_path / "c.yaml", cfg)


def _cache(path) -> np.ndarray:
    return np.concatenate([np.fromfile(f, "<f4") for f in sorted((path / "chunks").glob("*.bin"))])


def test_online_reference_with_another_tokenizer_is_the_carried_model_nll(tiny_data, xref):
    """CrossTokenizerReference on a batch: the reference model's own NLL of each row in its tokens, computed here
    with full logits one row at a time, carried by bytes; 0 where the label is ignored."""
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.loader import PackedLoader
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.build import TokenLossModel
    from megaslm.reference.cross import CrossTokenizerReference
    from megaslm.reference.xtok import CrossTokenizer

    lm = AutoModelForCausalLM.from_pretrained(xref, dtype=torch.float32).eval()

    class Plain:
        placement = "test"
        scorer = TokenLossModel(lm)

        def losses(self, ids, labels, position_ids=None):
            return self.scorer(ids, labels, position_ids).float()

    pair = CrossTokenizer(load_tokenizer(str(tiny_data["tok"])), load_tokenizer(xref))
    ref = CrossTokenizerReference(Plain(), pair)
    batch = PackedLoader(tiny_data["valid"], SEQ, 4).next_batch()
    batch["labels"][1, 5] = -100
    got = ref.losses_for(batch).numpy()
    windows = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
    windows[1, 6] = batch["input_ids"][1, 6]
    for r, plan in enumerate(pair.plan(list(windows))):
        ids = torch.tensor([plan.ref_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm(ids).logits.float()[0, :-1], -1)
        nll = np.concatenate([[0.0], -logp.gather(1, ids[0, 1:, None])[:, 0].numpy()])
        want = pair.carry(plan, nll, SEQ + 1)[1:]
        if r == 1:
            want[5] = 0.0
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)
    assert got[1, 5] == 0 and got.mean() > 1


def test_online_reference_rows_longer_than_its_positions_are_scored_in_blocks(tiny_data, xref):
    """A reference of 8 positions on windows of ~20 of its tokens: each row is cut into blocks of 8 tokens that
    overlap by one, every block scored from its own start (computed here block by block with full logits)."""
    import types

    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.loader import PackedLoader
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.build import TokenLossModel
    from megaslm.reference.cross import CrossTokenizerReference
    from megaslm.reference.xtok import CrossTokenizer

    lm = AutoModelForCausalLM.from_pretrained(xref, dtype=torch.float32).eval()
    limit = 8

    class Short:
        placement = "test"
        config = types.SimpleNamespace(max_position_embeddings=limit)
        scorer = TokenLossModel(lm)

        def losses(self, ids, labels, position_ids=None):
            assert ids.shape[1] <= limit
            return self.scorer(ids, labels, position_ids).float()

    pair = CrossTokenizer(load_tokenizer(str(tiny_data["tok"])), load_tokenizer(xref))
    batch = PackedLoader(tiny_data["valid"], SEQ, 3).next_batch()
    got = CrossTokenizerReference(Short(), pair).losses_for(batch).numpy()
    windows = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
    for r, plan in enumerate(pair.plan(list(windows))):
        assert len(plan.ref_ids) > 2 * limit - 1  # three blocks or more
        nll = [0.0]
        for start in range(0, len(plan.ref_ids) - 1, limit - 1):
            ids = torch.tensor([plan.ref_ids[start:start + limit]])
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids).logits.float()[0, :-1], -1)
            nll += list(-logp.gather(1, ids[0, 1:, None])[:, 0].numpy())
        np.testing.assert_allclose(got[r], pair.carry(plan, np.array(nll), SEQ + 1)[1:], rtol=1e-5, atol=1e-5)


def test_score_with_another_tokenizer_equals_imported_transformers_logprobs(tmp_path, small, xref):
    """`megaslm score` (reference of another tokenizer) and bench/logprobs_transformers.py + `score --import` write
    the same cache; over each whole document it holds the reference's total NLL (the carrying loses nothing)."""
    cfg = _config(tmp_path, small, xref, **{"reference.cache": str(tmp_path / "scored")})
    run_cli("score", str(cfg), "--storage-dtype", "float32", check=True)
    meta = json.loads((tmp_path / "scored" / "meta.json").read_text())
    assert meta["reference"]["alignment"] == "bytes-v1"
    logprobs = tmp_path / "lp.jsonl"
    subprocess.run([sys.executable, "bench/logprobs_transformers.py", "--model", xref, "--shards", small["valid"],
                    "--tokenizer", str(small["tok"]), "--block-tokens", str(SEQ), "--out", str(logprobs)],
                   cwd=REPO, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    imp = _config(tmp_path, small, xref, **{"reference.cache": str(tmp_path / "imported")})
    assert import_logprobs(load_config(imp), [str(logprobs)], storage_dtype="float32") == 0
    scored, imported = _cache(tmp_path / "scored"), _cache(tmp_path / "imported")
    assert scored.shape == imported.shape and np.abs(scored - imported).max() < 1e-5
    # Per document: the cached losses of its tokens (and its EOS) sum to the model's total NLL of it.
    from megaslm.data.shards import ShardSet
    from megaslm.reference.score_docs import document_starts

    starts = document_starts(ShardSet(small["train"]))
    worst = 0.0
    for rec in map(json.loads, logprobs.read_text().splitlines()):
        d = rec["doc"]
        if d == 0 or d + 1 >= len(starts) or starts[d + 1] - 1 > len(scored):
            continue  # position 0 and the tail past the last sequence are not cached
        s, e = starts[d], starts[d + 1]
        total = -sum(x for x in rec["logprobs"]) - rec["eos_logprob"]
        worst = max(worst, abs(scored[s - 1:e - 1].astype(np.float64).sum() - total) / total)
    assert worst < 1e-4, worst


def test_import_refuses_a_text_that_is_not_the_documents_and_missing_documents(tmp_path, small, xref):
    cfg = _config(tmp_path, small, xref, **{"reference.cache": str(tmp_path / "c")})
    bad = tmp_path / "bad.jsonl"
    record = {"doc": 3, "text": "not the text", "tokens": ["not the text"], "logprobs": [-1.0]}
    bad.write_text(json.dumps(record) + "\n")
    res = run_cli("score", str(cfg), "--import", str(bad))  # the command line: one line, exit 2
    assert res.returncode == 2 and res.stderr.startswith(f"error: {bad} line 1: the text of document 3 does not "
                                                         "match data.train"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"doc": 1, "spans": [], "logprobs": []}) + "\n")
    with pytest.raises(UserError, match=r"^document 0 of data.train .* has no log-probabilities in .*one.jsonl"):
        import_logprobs(load_config(cfg), [str(one)], storage_dtype="float32")
    assert not (tmp_path / "c").exists()


def test_slm_run_with_an_online_reference_of_another_tokenizer_selects_exactly_ratio(tmp_path, tiny_data, xref):
    res = run_cli("train", str(_config(tmp_path, tiny_data, xref, **{"train.micro_batch_size": 2})), check=True)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2], res.stdout[-2000:]
    for r in rows:
        assert r["n_selected"] == math.ceil(0.6 * 2 * SEQ)
        assert 0 < r["ref_loss"] < 20
    no_tok = _config(tmp_path, tiny_data, xref, **{"data.tokenizer": None, "run.dir": str(tmp_path / "run2")})
    res = run_cli("train", str(no_tok))
    assert res.returncode == 2 and "set data.tokenizer to the shards' tokenizer" in res.stderr
