"""Resume on another layout, measured: for each layout change, an uninterrupted run of 6 steps (checkpoints every
2) and a resume from its step-2 checkpoint under the other layout, with the optimizer step's batch kept; prints the
largest relative loss difference over steps 3-6, the conversion's seconds and its disk against the checkpoint's.

    python bench/reshard_matrix.py [--only zero2-2to1 ...] [--model tiny] [--out DIR]
    python bench/reshard_matrix.py --cost 768 12     # the conversion alone, for a Llama of that width and depth

Real `megaslm train` launches (torchrun, gloo on a CPU), the tiny Llama preset, fp32. Takes a few minutes per row
on 2 cores. The table goes into docs/resilience.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# name: (ZeRO stage, ranks, micro-batch, grad_accum, tensor-parallel) before -> after; 4 or 6 sequences a step
CASES = {
    "zero1-2to1": (("zero1", 2, 2, 1, 1), ("zero1", 1, 4, 1, 1)),
    "zero2-2to1-accum": (("zero2", 2, 2, 1, 1), ("zero2", 1, 2, 2, 1)),
    "zero3-2to1": (("zero3", 2, 2, 1, 1), ("zero3", 1, 4, 1, 1)),
    "zero1-1to2": (("zero1", 1, 4, 1, 1), ("zero1", 2, 2, 1, 1)),
    "zero2-1to2": (("zero2", 1, 4, 1, 1), ("zero2", 2, 2, 1, 1)),
    "zero3-1to2": (("zero3", 1, 4, 1, 1), ("zero3", 2, 2, 1, 1)),
    "zero1-2to3": (("zero1", 2, 3, 1, 1), ("zero1", 3, 2, 1, 1)),
    "zero2-2to3": (("zero2", 2, 3, 1, 1), ("zero2", 3, 2, 1, 1)),
    "zero3-2to3": (("zero3", 2, 3, 1, 1), ("zero3", 3, 2, 1, 1)),
    "tp2to1": (("zero2", 2, 4, 1, 2), ("zero2", 1, 4, 1, 1)),
    "tp1to2": (("zero1", 1, 4, 1, 1), ("zero1", 2, 4, 1, 2)),
    "zero1to2-2to1": (("zero1", 2, 2, 1, 1), ("zero2", 1, 4, 1, 1)),
    "zero2to3": (("zero2", 2, 2, 1, 1), ("zero3", 2, 2, 1, 1)),  # refused: DeepSpeed does not convert across
}


def make_data(root: Path) -> dict:
    from megaslm.data.corpus import clean_documents
    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import train_tokenizer

    if (root / "train" / "meta.json").is_file():
        return {"tok": str(root / "tok"), "train": str(root / "train")}
    with open(root / "train.jsonl", "w") as f:
        for d in clean_documents(200_000, seed=0):
            f.write(json.dumps({"text": d["text"]}) + "\n")
    tok = train_tokenizer([str(root / "train.jsonl")], 512, str(root / "tok"))
    prepare([str(root / "train.jsonl")], tok, str(root / "train"))
    return {"tok": tok, "train": str(root / "train")}


def config(run: Path, data: dict, layout: tuple, model: str, resume: str = "latest") -> dict:
    zero, _, micro, accum, tp = layout
    return {"run": {"dir": str(run)}, "model": {"preset": model}, "parallel": {"tensor": tp},
            "data": {"train": data["train"], "tokenizer": data["tok"]},
            "train": {"steps": 6, "seq_len": 32, "micro_batch_size": micro, "grad_accum": accum, "save_every": 2,
                      "keep_checkpoints": 0, "lr": 2e-3, "warmup_steps": 2, "seed": 3, "resume_from": resume},
            "deepspeed": {"config": f"ds_configs/{zero}.json"}, "wandb": {"mode": "disabled"}}


def train(cfg: dict, ranks: int, path: Path) -> str:
    from megaslm.parallel.dist import free_port

    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "megaslm.cli", "train", str(path)]
    if ranks > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
                    "-m", "megaslm.cli"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows}


def mib(path: Path, skip: str | None = None) -> float:
    files = [p for p in path.rglob("*") if p.is_file() and (skip is None or skip not in p.parts)]
    return sum(p.stat().st_size for p in files) / 2**20


def run_case(name: str, before: tuple, after: tuple, data: dict, out: Path, model: str) -> dict:
    full = out / f"full-{'-'.join(map(str, before))}"
    if not (full / "metrics.jsonl").is_file():
        shutil.rmtree(full, ignore_errors=True)
        train(config(full, data, before, model), before[1], out / f"{full.name}.yaml")
    want = losses(full)
    cut = out / name
    shutil.rmtree(cut, ignore_errors=True)
    shutil.copytree(full, cut, ignore=shutil.ignore_patterns("lease.json", "universal"))
    t0 = time.time()
    said = train(config(cut, data, after, model, resume="step_00000002"), after[1], out / f"{name}.yaml")
    wall = time.time() - t0
    got = losses(cut)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in range(3, 7))
    tag = cut / "checkpoints" / "step_00000002"
    marker = json.loads((tag / "universal" / "megaslm_universal.json").read_text())
    line = next((x for x in said.splitlines() if "universal checkpoint" in x), "")
    return {"case": name, "from": before, "to": after, "max_rel_diff": worst, "convert_s": marker["seconds"],
            "ckpt_mib": mib(tag, skip="universal"), "universal_mib": mib(tag / "universal"), "resume_s": wall,
            "line": line}


def describe(layout: tuple) -> str:
    zero, ranks, micro, accum, tp = layout
    tp_part = f", TP {tp}" if tp > 1 else ""
    accum_part = f" x accum {accum}" if accum > 1 else ""
    return f"{ranks} rank{'s' if ranks > 1 else ''} x {micro}{accum_part}{tp_part}, ZeRO-{zero[-1]}"


def conversion_cost(hidden: int, layers: int, data: dict, out: Path) -> None:
    """A random Llama of `hidden` x `layers` (vocabulary 512), 2 steps on 2 ranks under ZeRO-2, then its step-2
    checkpoint converted by megaslm's own path (reshard.convert): seconds and MiB, per million parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.train import reshard

    model_dir = out / f"llama_{hidden}x{layers}"
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      tie_word_embeddings=True))
    params = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(model_dir)
    load_tokenizer(data["tok"]).save_pretrained(str(model_dir))
    run = out / f"cost_{hidden}x{layers}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = config(run, data, ("zero2", 2, 1, 1, 1), "tiny")
    cfg["model"] = {"init_from": str(model_dir)}
    cfg["train"].update(steps=2, seq_len=16)
    train(cfg, 2, out / f"{run.name}.yaml")
    tag = run / "checkpoints" / "step_00000002"
    t0 = time.time()
    done, problem, _ = reshard.convert(tag, reshard.Layout(2, 1, 2))
    seconds = time.time() - t0
    if problem:
        raise SystemExit(problem)
    ckpt, uni = mib(tag, skip="universal"), mib(done)
    print(f"{params / 1e6:.1f}M parameters: checkpoint {ckpt:.0f} MiB, conversion {seconds:.1f} s, universal "
          f"{uni:.0f} MiB ({uni * 2**20 / params:.1f} bytes per parameter; {seconds / params * 1e9:.1f} s per "
          f"billion parameters at this rate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(CASES), help="these cases (default all)")
    ap.add_argument("--model", default="tiny", help="model preset (default tiny)")
    ap.add_argument("--out", default="/tmp/megaslm_reshard", help="work directory (kept for inspection)")
    ap.add_argument("--cost", nargs=2, type=int, metavar=("HIDDEN", "LAYERS"),
                    help="measure the conversion alone on a random Llama of this width and depth")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_data(out)
    if args.cost:
        return conversion_cost(*args.cost, data, out)
    rows = []
    names = args.only or list(CASES)
    t0 = time.time()
    for i, name in enumerate(names, 1):
        before, after = CASES[name]
        try:
            rows.append(run_case(name, before, after, data, out, args.model))
        except SystemExit as e:
            lines = str(e).splitlines()
            said = next((x for x in lines if x.startswith("error:")), lines[-1])
            rows.append({"case": name, "from": before, "to": after, "failed": said[:400]})
        r = rows[-1]
        figure = f"{r['max_rel_diff']:.1e}" if "failed" not in r else f"FAILED: {r['failed']}"
        print(f"[{i}/{len(names)}, {time.time() - t0:.0f} s] {name}: {figure}", flush=True)
    print("\n| change | before | after | largest rel. loss diff, steps 3-6 | conversion s | checkpoint MiB | "
          "universal MiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['case']} | {describe(r['from'])} | {describe(r['to'])} | failed: {r['failed']} | | | |")
        else:
            print(f"| {r['case']} | {describe(r['from'])} | {describe(r['to'])} | {r['max_rel_diff']:.1e} | "
                  f"{r['convert_s']:.1f} | {r['ckpt_mib']:.1f} | {r['universal_mib']:.1f} |")
    (out / "reshard_matrix.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
