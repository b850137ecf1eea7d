"""bench/bench_gpu.py's CPU-runnable parts: the refusal without CUDA, and the whole pipeline (shards, random
reference, `megaslm score`, three Trainer workers, the table) on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

BENCH = str(REPO / "bench" / "bench_gpu.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_exits_with_a_clear_message():
    res = subprocess.run([sys.executable, BENCH], capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 2
    assert "no CUDA GPU" in res.stderr and "--device cpu --tiny" in res.stderr


@pytest.mark.slow
def test_tiny_cpu_run_prints_the_table(tmp_path):
    res = subprocess.run([sys.executable, BENCH, "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [x for x in res.stdout.splitlines() if x.startswith("| clm") or x.startswith("| slm_")]
    assert [r.split("|")[1].strip() for r in rows] == ["clm", "slm_online", "slm_cached"]
    out = json.loads((tmp_path / "bench_gpu.json").read_text())["results"]
    assert out["slm_online"]["reference_placement"] == "replicated"
    assert out["slm_cached"]["reference_placement"] == "cache"
    for v in ("clm", "slm_online", "slm_cached"):
        assert out[v]["tokens_per_s"] > 0 and out[v]["peak_bytes"] > 0 and out[v]["params"] > 0
    assert out["clm"]["selected_frac"] is None and 0.55 < out["slm_online"]["selected_frac"] < 0.65
