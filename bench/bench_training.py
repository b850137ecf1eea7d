"""Training throughput, side by side in one run: ZeRO stages, and SLM step time vs CLM step time.

Runs short real trainings (2 processes; gloo on CPU, NCCL on GPUs) back to back, alternating the variants
over several rounds so that machine noise hits them alike, and prints medians (first 3 steps skipped).
    python bench/bench_training.py zero [--stages zero1,zero2,zero3]   # tokens/s per ZeRO stage, ratio to zero2
    python bench/bench_training.py slm                                  # SLM / CLM step time, same-size reference
Options: --steps 30 --rounds 2 --seq-len 128 --micro-batch 8 --nproc 2 --preset tiny
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


def make_reference(root: Path, tok: str, preset: str) -> str:
    """A same-size reference model directory (random init: its quality does not change the step time)."""
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    t = load_tokenizer(tok)
    AutoModelForCausalLM.from_config(preset_config(preset, t.vocab_size)).save_pretrained(root / "ref")
    t.save_pretrained(str(root / "ref"))
    return str(root / "ref")


def run(root: Path, shards: str, variant: str, args, i: int, field: str, extra: dict | None = None) -> list[float]:
    from megaslm.parallel.dist import free_port

    run_dir = root / f"{variant}_{i}"
    stage = variant if variant.startswith("zero") else "zero2"
    cfg = {"run": {"dir": str(run_dir)}, "model": {"preset": args.preset}, "data": {"train": shards},
           "train": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch},
           "deepspeed": {"config": f"ds_configs/{stage}.json"}, "wandb": {"mode": "disabled"}, **(extra or {})}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", "-m", "megaslm.cli", "train", str(root / "c.yaml")]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[field] for r in recs[3:]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("compare", choices=["zero", "slm"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stages", default="zero1,zero2,zero3")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        tok, shards = make_data(root)
        if args.compare == "zero":
            variants = {s: None for s in args.stages.split(",")}
            field = "tokens_per_s"
        else:
            ref = make_reference(root, tok, args.preset)
            variants = {"clm": None, "slm": {"objective": "slm", "reference": {"path": ref, "placement": "replicated"}}}
            field = "step_time"
        vals = {v: [] for v in variants}
        for i in range(args.rounds):
            for v, extra in variants.items():
                vals[v] += run(root, shards, v, args, i, field, extra)
    med = {v: statistics.median(x) for v, x in vals.items()}
    print(f"preset {args.preset}, {args.nproc} processes, seq {args.seq_len} x micro-batch {args.micro_batch}, "
          f"{args.steps} steps x {args.rounds} rounds (median of steps 4+)")
    if args.compare == "zero":
        base = med.get("zero2", next(iter(med.values())))
        print(f"{'stage':8} {'tokens/s':>10} {'vs zero2':>9}")
        for s in variants:
            print(f"{s:8} {med[s]:10.0f} {med[s] / base:9.2f}")
    else:
        print(f"CLM step {med['clm']:.4f} s, SLM step {med['slm']:.4f} s (same-size replicated reference): "
              f"SLM/CLM = {med['slm'] / med['clm']:.3f} (ideal ~1.33: one extra forward)")


if __name__ == "__main__":
    main()
