"""How many selected tokens change when the reference-loss cache is stored as float16 instead of float32.

Scores the training shards twice with the real `megaslm score` (--storage-dtype float32 and float16, one process),
reads both caches back with CachedReference, and for every full global batch (--batch sequences of --seq-len)
selects the top --ratio tokens by excess = L_model - L_ref with each cache, for each model given with --model
(the model being trained, at some point of its training). Prints the fraction of selected tokens that differ and
the largest loss difference between the caches.

    python bench/bench_cache_dtype.py --shards DEMO/shards/noisy --reference REF_HF --model M1 [--model M2 ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent


def score(shards: str, reference: str, cache: Path, dtype: str, seq_len: int) -> None:
    cfg = {"run": {"dir": str(cache) + "_run"}, "data": {"train": shards}, "objective": "slm",
           "train": {"seq_len": seq_len, "micro_batch_size": 16}, "wandb": {"mode": "disabled"},
           "reference": {"path": reference, "placement": "replicated", "cache": str(cache)}}
    path = cache.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "megaslm.cli", "score", str(path), "--storage-dtype", dtype], cwd=ROOT,
                   check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


@torch.no_grad()
def model_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids[:, :-1]).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none").view(
        input_ids.shape[0], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--out", default="/tmp/bench_cache_dtype")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.6)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from megaslm.data.shards import ShardSet
    from megaslm.loss.selection import select_tokens
    from megaslm.reference import CachedReference

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = ShardSet(a.shards)
    caches = {}
    for dtype in ("float32", "float16"):
        score(a.shards, a.reference, out / f"cache_{dtype}", dtype, a.seq_len)
        caches[dtype] = CachedReference(str(out / f"cache_{dtype}"), shards, a.seq_len)
    n_seq = caches["float32"].num_sequences
    all32 = caches["float32"].sequences(range(n_seq))
    all16 = caches["float16"].sequences(range(n_seq))
    size32 = sum(f.stat().st_size for f in (out / "cache_float32" / "chunks").iterdir())
    size16 = sum(f.stat().st_size for f in (out / "cache_float16" / "chunks").iterdir())
    print(f"{n_seq} sequences x {a.seq_len} tokens; cache bytes float32 {size32}, float16 {size16}; "
          f"max |loss32 - loss16| {np.abs(all32 - all16).max():.2e}, mean {np.abs(all32 - all16).mean():.2e} nats")
    T = a.seq_len
    for m in a.model:
        model = AutoModelForCausalLM.from_pretrained(m).eval()
        changed = selected = 0
        for lo in range(0, n_seq - a.batch + 1, a.batch):
            ids = torch.from_numpy(shards.read(lo * T, (lo + a.batch) * T + 1).astype(np.int64))
            windows = torch.stack([ids[i * T:i * T + T + 1] for i in range(a.batch)])
            loss = model_losses(model, windows)
            valid = torch.ones_like(loss, dtype=torch.bool)
            s32 = select_tokens(loss - torch.from_numpy(all32[lo:lo + a.batch]), valid, a.ratio, "rank")
            s16 = select_tokens(loss - torch.from_numpy(all16[lo:lo + a.batch]), valid, a.ratio, "rank")
            changed += int((s32 & ~s16).sum())
            selected += int(s32.sum())
        print(f"model {m}: {changed} of {selected} selected tokens change with the float16 cache "
              f"({100 * changed / max(selected, 1):.4f}%), ratio {a.ratio}, batches of {a.batch} x {T}", flush=True)


if __name__ == "__main__":
    main()
