"""`megaslm analyze tokens`, `megaslm analyze dynamics`, `megaslm report`, and the training-time token view, on
real runs: a CLM reference trained and exported, then an SLM run against it that keeps all its checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from megaslm.cli import main as cli
from tests.conftest import read_metrics, run_cli, write_config

pytestmark = pytest.mark.slow
RATIO = Fraction(3, 5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(run_dir, data, steps, **extra):
    cfg = {"run": {"dir": str(run_dir)}, "model": {"preset": "tiny"},
           "data": {"train": data["train"], "valid": data["valid"], "tokenizer": data["tok"], "valid_sequences": 4},
           "train": {"steps": steps, "seq_len": 32, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                     "seed": 3},
           "wandb": {"mode": "offline", "project": "megaslm-test"}}
    for key, value in extra.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    return cfg


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_data):
    """A CLM reference run (exported), and an SLM run that keeps every checkpoint and logs the token view."""
    from megaslm.export import export

    root = tmp_path_factory.mktemp("analyze")
    ref_run = root / "reference"
    ref_cfg = _config(ref_run, tiny_data, 4, wandb__mode="disabled")
    run_cli("train", str(write_config(root / "ref.yaml", ref_cfg)), check=True)
    ref_hf = export(str(ref_run), str(root / "reference_hf"))
    slm_run = root / "slm"
    cfg = _config(slm_run, tiny_data, 6, train__save_every=2, train__keep_checkpoints=0, train__eval_every=3,
                  train__token_view_every=3)
    cfg.update(objective="slm", slm={"ratio": 0.6, "scope": "global"}, reference={"path": str(ref_hf), "placement": "replicated"})
    run_cli("train", str(write_config(root / "slm.yaml", cfg)), check=True)
    return {"root": root, "ref_run": ref_run, "ref_hf": ref_hf, "slm_run": slm_run, "data": tiny_data}


@pytest.fixture(scope="session")
def outputs(runs):
    """The three commands, run once on the runs above."""
    d, root = runs["data"], runs["root"]
    assert cli(["analyze", "tokens", "--model", str(runs["slm_run"]), "--reference", str(runs["ref_hf"]),
                "--data", str(d["root"] / "valid.jsonl"), "--docs", "3", "--seq-len", "48", "--ratio", "0.6",
                "--out", str(root / "tokens")]) == 0
    assert cli(["analyze", "dynamics", str(runs["slm_run"]), "--data", d["valid"], "--reference",
                str(runs["ref_hf"]), "--tokens", "500", "--out", str(root / "dynamics")]) == 0
    assert cli(["report", str(runs["ref_run"]), str(runs["slm_run"]), "--out", str(root / "report")]) == 0
    return {"tokens": root / "tokens", "dynamics": root / "dynamics", "report": root / "report"}


class _Spans(HTMLParser):
    """Token spans of the page, in order: (selected, title, text)."""

    def __init__(self):
        super().__init__()
        self.tokens, self._cur, self.tags = [], None, set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "span" and "t" in classes:
            self._cur = ["s" in classes, a.get("title", ""), ""]

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[2] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            self.tokens.append(tuple(self._cur))
            self._cur = None


def _parse(path: Path) -> tuple[_Spans, str]:
    text = path.read_text()
    p = _Spans()
    p.feed(text)
    p.close()
    return p, text


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_token_page_marks_exactly_the_global_top_k(outputs):
    rows = _rows(outputs["tokens"] / "tokens.jsonl")
    n = len(rows)
    k = math.ceil(RATIO * n)
    assert {r["doc"] for r in rows} == {0, 1, 2}
    assert sum(r["selected"] for r in rows) == k
    sel = [r["excess"] for r in rows if r["selected"]]
    rest = [r["excess"] for r in rows if not r["selected"]]
    assert min(sel) >= max(rest)
    page, text = _parse(outputs["tokens"] / "tokens.html")
    assert {"html", "head", "style", "body", "table"} <= page.tags
    assert "<script" not in text and "src=" not in text and "url(" not in text and "@import" not in text
    assert len(page.tokens) == n
    assert sum(s for s, _, _ in page.tokens) == k
    assert [s for s, _, _ in page.tokens] == [r["selected"] for r in rows]
    for (_, title, _), r in zip(page.tokens, rows):
        assert f"loss {r['loss']:.3f}" in title and f"ref_loss {r['ref_loss']:.3f}" in title
        assert ("not selected" not in title) == r["selected"]


def test_token_losses_equal_a_full_logits_forward(runs, outputs):
    """tokens.jsonl against transformers' own forward with full logits, window by window, for both models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaslm.export import export

    model_hf = export(str(runs["slm_run"]), str(runs["root"] / "slm_hf"))
    tok = AutoTokenizer.from_pretrained(runs["ref_hf"])
    texts = [json.loads(x)["text"] for x in (runs["data"]["root"] / "valid.jsonl").read_text().splitlines()[:3]]
    rows = _rows(outputs["tokens"] / "tokens.jsonl")
    for column, path in (("loss", model_hf), ("ref_loss", runs["ref_hf"])):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for doc, text in enumerate(texts):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            got = [r for r in rows if r["doc"] == doc]
            assert [r["token_id"] for r in got] == ids
            assert "".join(r["piece"] for r in got) == tok.decode(ids)
            stream = torch.tensor([tok.eos_token_id] + ids)
            want = []
            for s in range(0, len(stream) - 1, 48):
                w = stream[s:s + 49]
                with torch.no_grad():
                    logits = lm(w[None, :-1]).logits[0].double()
                want.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
            np.testing.assert_allclose([r[column] for r in got], torch.cat(want).numpy(), atol=1e-4, rtol=0)


def test_dynamics_categories_partition_the_sample(runs, outputs):
    from megaslm.data.shards import ShardSet

    out = outputs["dynamics"]
    ckpts = sorted(p.name for p in (runs["slm_run"] / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004", "step_00000006"]  # keep_checkpoints 0 kept them all
    with open(out / "dynamics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "category", "n_tokens", "mean_loss"]
    traj = np.load(out / "token_losses.npz")
    losses = traj["losses"]
    assert losses.shape == (3, 500)
    np.testing.assert_array_equal(traj["token_ids"], ShardSet(runs["data"]["valid"]).read(1, 501))
    summary = json.loads((out / "dynamics.json").read_text())
    thr = summary["threshold"]
    assert thr == pytest.approx(float(losses[-1].mean()), rel=1e-6)
    first, last = losses[0] > thr, losses[-1] > thr
    masks = {"H->H": first & last, "L->H": ~first & last, "H->L": first & ~last, "L->L": ~first & ~last}
    for c, step in enumerate([2, 4, 6]):
        at = [r for r in rows if int(r["step"]) == step]
        assert [r["category"] for r in at] == ["H->H", "L->H", "H->L", "L->L"]
        assert sum(int(r["n_tokens"]) for r in at) == 500
        for r in at:
            m = masks[r["category"]]
            assert int(r["n_tokens"]) == int(m.sum())
            if m.any():
                assert float(r["mean_loss"]) == pytest.approx(float(losses[c, m].mean()), rel=1e-5)
    with open(out / "selection.csv") as f:
        sel = list(csv.DictReader(f))
    assert sum(int(r["n_selected"]) for r in sel) == math.ceil(RATIO * 500)
    assert [int(r["n_tokens"]) for r in sel] == [int(masks[c].sum()) for c in ("H->H", "L->H", "H->L", "L->L")]
    assert (out / "dynamics.png").read_bytes()[:8] == PNG_MAGIC


def test_report_plots_are_valid_pngs(runs, outputs):
    from PIL import Image

    out = outputs["report"]
    report = json.loads((out / "report.json").read_text())
    assert set(report["plots"]) == {"train_loss.png", "slm_losses.png", "val_loss.png", "selected_frac.png",
                                    "excess.png", "throughput.png"}
    md = (out / "report.md").read_text()
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and f"]({name})" in md
        with Image.open(out / name) as im:
            im.verify()
    last_val = [r["val_loss"] for r in read_metrics(runs["slm_run"]) if r.get("val_loss") is not None][-1]
    assert report["runs"]["slm"]["final_val_loss"] == pytest.approx(last_val)
    assert report["runs"]["reference"]["objective"] == "clm"


def test_token_view_during_training_and_wandb_media(runs, outputs):
    run = runs["slm_run"]
    for step in (3, 6):
        page, _ = _parse(run / "token_view" / f"step_{step:08d}.html")
        n = len(page.tokens)
        assert n == 4 * 32 and sum(s for s, _, _ in page.tokens) == math.ceil(RATIO * n)
    media = [p for p in run.glob("wandb/offline-run-*/files/media/**/*") if p.is_file()]
    pages = [p.read_text() for p in media if p.suffix == ".html"]
    assert any("token view at step 6" in t for t in pages)  # logged by the trainer
    # `analyze` and `report` read the run without adding an offline wandb folder to it (one per call, before):
    # the training's own folder is the only one, and their pages and plots are files on disk.
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    assert not any("megaslm analyze tokens" in t for t in pages)
    # The in-process commands stopped their wandb service: later training processes must not inherit its address.
    assert "WANDB_SERVICE" not in os.environ


def test_bad_inputs_are_refused_with_a_message(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from megaslm.config import from_dict
    from megaslm.errors import UserError
    from megaslm.model.presets import preset_config

    other = tmp_path / "vocab600"
    AutoModelForCausalLM.from_config(preset_config("tiny", 600)).save_pretrained(other)
    assert cli(["analyze", "tokens", "--model", str(runs["slm_run"]), "--reference", str(other), "--data",
                runs["data"]["valid"], "--out", str(tmp_path / "x")]) == 2
    assert "vocab_size 512" in capsys.readouterr().err
    assert cli(["analyze", "dynamics", str(runs["ref_run"]), "--data", runs["data"]["valid"], "--out",
                str(tmp_path / "y")]) == 2
    assert "train.keep_checkpoints: 0" in capsys.readouterr().err
    assert cli(["analyze", "tokens", "--model", str(runs["ref_hf"]), "--reference", str(runs["ref_hf"]), "--data",
                runs["data"]["valid_other"], "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err  # the shard/tokenizer check of training
    assert "valid_other were tokenized with vocab_size 600" in err and "has vocab_size 512" in err
    with pytest.raises(UserError, match="train.keep_checkpoints"):
        from_dict({"run": {"dir": "r"}, "data": {"train": "t"}, "train": {"keep_checkpoints": -1}})
