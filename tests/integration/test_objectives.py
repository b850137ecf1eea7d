"""Objective variants end to end on the real DeepSpeed trainer: token-weighted gradient accumulation, soft weights
across data-parallel ranks, `score: loss`, reference ensembles, EMA self-reference (with resume), start_step.

Runs are shared between assertions (module-scoped fixtures) and kept to a few steps of the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, read_metrics, run_cli, write_config
from tests.distributed._spawn import run_gloo

pytestmark = pytest.mark.slow

SEQ = 32


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_data):
    """A reference / initial model directory as `megaslm export` writes it (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    out = tmp_path_factory.mktemp("obj_ref") / "good"
    torch.manual_seed(11)
    AutoModelForCausalLM.from_config(preset_config("tiny", 512)).save_pretrained(out)
    load_tokenizer(tiny_data["tok"]).save_pretrained(str(out))
    return str(out)


def config(run_dir, data, init=None, mb=4, zero="zero2", **sections):
    t = {"steps": 3, "seq_len": SEQ, "micro_batch_size": mb, "lr": 2e-3, "warmup_steps": 1, "seed": 5}
    t.update(sections.pop("train", {}))
    cfg = {"run": {"dir": str(run_dir)}, "model": {"init_from": init} if init else {"preset": "tiny"},
           "data": {"train": data["train"]}, "train": t, "deepspeed": {"config": f"ds_configs/{zero}.json"},
           "wandb": {"mode": "disabled"}, "objective": "slm", "slm": {"ratio": 0.6}}
    cfg.update(sections)
    return cfg


def train(tmp, name, cfg, nproc=None, env=None, check=True):
    res = run_cli("train", str(write_config(tmp / f"{name}.yaml", cfg)), nproc=nproc, env=env, check=check)
    return res if not check else read_metrics(cfg["run"]["dir"])


def same(a, b, keys, rel=1e-5):
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


# ---------------------------------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, good):
    """One-process runs from the same initial model (`good`), 3 steps each."""
    tmp = tmp_path_factory.mktemp("obj_runs")
    specs = {
        "ref": {"reference": {"path": good}},
        "ema1": {"reference": {"ema_decay": 1.0}},
        "ensemble": {"reference": {"path": [good, good], "combine": "min"}},
        "clm": {"objective": "clm"},
        "start": {"reference": {"path": good}, "slm": {"ratio": 0.6, "start_step": 2}},
        "loss": {"slm": {"ratio": 0.6, "score": "loss"}},
    }
    return {name: train(tmp, name, config(tmp / name, tiny_data, init=good, **spec)) for name, spec in
            specs.items()} | {"dir": tmp}


SLM_KEYS = ("loss", "loss_all", "ref_loss", "n_selected", "threshold", "loss_unselected", "excess_p50")


def test_ema_decay_one_is_the_initial_model_as_reference(runs):
    """d = 1 keeps the initial weights: the same run as one whose reference is that (exported) initial model."""
    same(runs["ema1"], runs["ref"], SLM_KEYS)
    info = json.loads((runs["dir"] / "ema1" / "run_info.json").read_text())
    assert info["reference_placement"] == "ema"


def test_ensemble_of_one_reference_twice_is_that_reference(runs):
    same(runs["ensemble"], runs["ref"], SLM_KEYS)
    info = json.loads((runs["dir"] / "ensemble" / "run_info.json").read_text())
    assert info["reference_placement"] == "ensemble[replicated,replicated]"


def test_start_step_runs_clm_before_it(runs):
    start, clm, ref = runs["start"], runs["clm"], runs["ref"]
    same(start[:2], clm[:2], ("loss", "loss_all", "n_valid", "grad_norm"), rel=1e-6)
    assert [r["slm_ratio"] for r in start] == [1.0, 1.0, 0.6]
    assert "n_selected" not in start[0] and start[2]["n_selected"] == ref[2]["n_selected"]
    assert start[2]["loss"] != pytest.approx(ref[2]["loss"], rel=1e-6)  # its model took two CLM steps instead


def test_score_loss_needs_and_loads_no_reference(runs):
    info = json.loads((runs["dir"] / "loss" / "run_info.json").read_text())
    assert info["reference_placement"] is None
    first = runs["loss"][0]
    assert "ref_loss" not in first and first["n_selected"] == runs["ref"][0]["n_selected"]
    # Step 1 starts from the same weights: the selected tokens are the highest-loss ones, so their mean loss
    # is the largest possible over that many tokens, above the mean of the excess-selected tokens; the
    # threshold (the k-th largest loss) separates selected from unselected losses.
    assert first["loss_selected"] > runs["ref"][0]["loss_selected"]
    assert first["loss_unselected"] <= first["threshold"] <= first["loss_selected"]


# ---------------------------------------------------------------------------------------------- data parallel
def test_soft_weighting_is_exact_across_data_parallel_ranks(tmp_path, tiny_data, good):
    soft = {"reference": {"path": good}, "slm": {"ratio": 0.6, "weighting": "soft", "temperature": 0.3}}
    two = train(tmp_path, "dp2", config(tmp_path / "dp2", tiny_data, mb=2, **soft), nproc=2)
    one = train(tmp_path, "dp1", config(tmp_path / "dp1", tiny_data, mb=4, **soft))
    same(two, one, ("loss", "loss_all", "effective_frac", "weight_entropy", "threshold", "n_selected", "grad_norm"),
         rel=1e-4)
    assert all(0 < r["effective_frac"] < 1 and r["slm_ratio"] == 0.6 for r in two)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_reference_resumes_exactly_after_a_crash_on_another_world_size(tmp_path, tiny_data):
    """1 rank x micro-batch 4 crashes after step 3; the resume from step 2 runs on 2 ranks x 2 (the same
    optimizer-step batch, through DeepSpeed's universal checkpoint) and continues the same average."""
    ema = {"reference": {"ema_decay": 0.5}, "train": {"steps": 4, "save_every": 2}}
    whole = train(tmp_path, "whole", config(tmp_path / "whole", tiny_data, **ema))
    cfg = config(tmp_path / "crashed", tiny_data, **ema)
    res = train(tmp_path, "crashed", cfg, env={"MEGASLM_FAULT": "crash_after_step:3"}, check=False)
    assert res.returncode != 0 and "injected fault" in res.stderr
    res = train(tmp_path, "crashed2", config(tmp_path / "crashed", tiny_data, mb=2, **ema), nproc=2, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "written by 1 data-parallel rank, ZeRO-2; this launch has 2 data-parallel ranks" in res.stdout
    resumed = [r for r in read_metrics(tmp_path / "crashed") if r["step"] >= 3][-2:]
    assert [r["step"] for r in resumed] == [3, 4]
    same(resumed, whole[2:], ("loss", "ref_loss", "threshold", "n_selected", "grad_norm"), rel=1e-6)
    # The average moved away from the initial model: the reference loss differs from a frozen copy's.
    assert whole[3]["ref_loss"] != pytest.approx(whole[0]["ref_loss"], rel=1e-3)


def test_ema_refuses_zero3(tmp_path, tiny_data):
    cfg = config(tmp_path / "z3", tiny_data, zero="zero3", reference={"ema_decay": 0.9})
    res = train(tmp_path, "z3", cfg, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    err = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "reference.ema_decay" in err[0] and "ZeRO-3" in err[0], res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- gradient accumulation
class _Rows:
    """A loader of fixed token rows with part of the labels masked (-100), like SFT loss masks."""

    def __init__(self, train_dir, rank, mb, masked):
        from megaslm.data.shards import ShardSet

        self.shards, self.rank, self.mb, self.masked, self.i = ShardSet(train_dir), rank, mb, masked, 0
        self.epoch = 0

    def next_batch(self):
        import numpy as np

        rows = []
        for _ in range(self.mb):  # row i of the run-wide stream: rank r holds rows r*4 .. r*4+3 of each step
            step, k = divmod(self.i, 4)
            g = (step * 2 + self.rank) * 4 + k
            rows.append(self.shards.read(g * SEQ, g * SEQ + SEQ + 1).astype(np.int64))
            self.i += 1
        flat = torch.from_numpy(np.stack(rows))
        labels = flat[:, 1:].clone()
        for r in range(self.mb):
            k = (self.i - self.mb + r) % 4
            labels[r, :self.masked.get(k, 0)] = -100
        return {"input_ids": flat[:, :-1], "labels": labels, "index": torch.full((self.mb,), -1)}

    def state_dict(self):
        return {"epoch": 0}


def _accum_worker(rank, world, train_dir, root, out):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from megaslm.config import from_dict
    from megaslm.train.trainer import Trainer

    got = {}
    for name, mb, ga in (("one_batch", 4, 1), ("accumulated", 2, 2)):
        cfg = from_dict({"run": {"dir": f"{root}/{name}"}, "model": {"preset": "tiny"}, "data": {"train": train_dir},
                         "train": {"steps": 3, "seq_len": SEQ, "micro_batch_size": mb, "grad_accum": ga, "lr": 3e-3,
                                   "warmup_steps": 0, "seed": 7},
                         "wandb": {"mode": "disabled"}})
        trainer = Trainer(cfg)
        # Rows 0 and 1 (the first micro-batch of the accumulated run) lose most labels, rank 1 more than rank 0.
        trainer.loader = _Rows(train_dir, rank, mb, {0: 20 + 8 * rank, 1: 28})
        recs = [trainer.train_step() for _ in range(3)]
        params = torch.cat([p.detach().float().reshape(-1) for p in trainer.engine.module.parameters()])
        got[name] = {"recs": [{k: r[k] for k in ("loss", "n_valid", "grad_norm")} for r in recs], "params": params}
        trainer.monitor.close()
    if rank == 0:
        torch.save(got, out)


def test_grad_accum_with_unequal_label_counts_equals_one_big_batch(tmp_path, tiny_data):
    """2 gloo ranks, ZeRO-2: grad_accum 2 x micro-batch 2 (the first micro-step of each rank
    holds 16 or 8 labelled tokens, the second 64)
    takes the same steps as micro-batch 4: token-weighted loss, same gradient norm, same parameters."""
    out = tmp_path / "accum.pt"
    run_gloo(_accum_worker, 2, tiny_data["train"], str(tmp_path), str(out), timeout=600)
    got = torch.load(out)
    a, b = got["accumulated"], got["one_batch"]
    for ra, rb in zip(a["recs"], b["recs"]):
        assert ra["n_valid"] == rb["n_valid"] == (4 * SEQ - 20 - 28) + (4 * SEQ - 28 - 28)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    # Adam turns float-summation noise in near-zero gradients into visible updates: the parameters agree to
    # a few percent of one step (lr 3e-3); loss and gradient norm above are the sharp checks.
    torch.testing.assert_close(a["params"], b["params"], rtol=1e-4, atol=1e-4)


def test_a_training_step_waits_on_the_device_only_for_its_figures_and_the_compaction(tmp_path, tiny_data, good):
    """bench/count_step_syncs.py's counters around a real SLM run (global scope, 2 micro-steps, a reference):
    per steady-state step, megaslm's own code makes one host transfer (the figures and the grad norm, read by the
    skip guard) and one `nonzero` per micro-step (the head's compaction of the selected tokens); no `item`,
    `float(t)` or `if t:` of its own. DeepSpeed's, transformers' and torch.optim's calls are theirs."""
    cfg = config(tmp_path / "run", tiny_data, reference={"path": good}, train={"steps": 5, "grad_accum": 2})
    out = tmp_path / "counts"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "count_step_syncs.py"), "--worker", str(out), "train",
                          str(write_config(tmp_path / "c.yaml", cfg))], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "counts.0").read_text())
    ours = {f"{name} {where}": n for kind, name, where, n in rows if kind == "sync" and where.startswith("megaslm ")}
    assert ours == {"tolist megaslm metrics.resolve_all": 1, "nonzero megaslm per_token_ce.backward": 2}
