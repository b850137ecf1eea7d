"""Tokens/s of the tiny model under ZeRO-1/2/3 on 2 processes (gloo on CPU, NCCL on GPUs).

Runs short trainings back to back, alternating the stages over several rounds so that machine noise hits
them alike, and prints the median tokens/s of each (first steps skipped) and the ratios to ZeRO-2.
    python bench/bench_zero_stages.py [--steps 30] [--rounds 2] [--seq-len 128] [--micro-batch 8] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_data(root: Path) -> tuple[str, str]:
    from megaslm.data.corpus import clean_documents
    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import train_tokenizer

    with open(root / "text.jsonl", "w") as f:
        for d in clean_documents(1_500_000, seed=0):
            f.write(json.dumps({"text": d["text"]}) + "\n")
    tok = train_tokenizer([str(root / "text.jsonl")], 2000, str(root / "tok"))
    prepare([str(root / "text.jsonl")], tok, str(root / "shards"))
    return tok, str(root / "shards")


def run(root: Path, shards: str, stage: str, args, i: int) -> list[float]:
    from megaslm.parallel.dist import free_port

    run_dir = root / f"{stage}_{i}"
    cfg = {"run": {"dir": str(run_dir)}, "model": {"preset": args.preset}, "data": {"train": shards},
           "train": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch},
           "deepspeed": {"config": f"ds_configs/{stage}.json"}, "wandb": {"mode": "disabled"}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", "-m", "megaslm.cli", "train", str(root / "c.yaml")]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in recs[3:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stages", default="zero1,zero2,zero3")
    args = ap.parse_args()
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _, shards = make_data(root)
        tps = {s: [] for s in stages}
        for i in range(args.rounds):
            for s in stages:
                tps[s] += run(root, shards, s, args, i)
    med = {s: statistics.median(v) for s, v in tps.items()}
    base = med.get("zero2", next(iter(med.values())))
    print(f"preset {args.preset}, {args.nproc} processes, seq {args.seq_len} x micro-batch {args.micro_batch}, "
          f"{args.steps} steps x {args.rounds} rounds (median of steps 4+)")
    print(f"{'stage':8} {'tokens/s':>10} {'vs zero2':>9}")
    for s in stages:
        print(f"{s:8} {med[s]:10.0f} {med[s] / base:9.2f}")


if __name__ == "__main__":
    main()
