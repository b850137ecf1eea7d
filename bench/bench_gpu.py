"""One-GPU benchmark of the tinyllama-1.1b preset in bf16: CLM, SLM online, SLM cached, side by side in one run.

    python bench/bench_gpu.py                      # one CUDA GPU; about 5 minutes on an H100 (never run on one yet)
    python bench/bench_gpu.py --device cpu --tiny  # the same code path on the CPU with the tiny preset (a check)

Steps, each printing a progress line:
1. text from the corpora that ship with the installed packages (megaslm.data.corpus: docstrings and Debian docs),
   tokenized with the Mistral v1 SentencePiece model (32000 pieces, from the mistral-common wheel) when installed,
   else with a tokenizer trained here; token shards just large enough for the steps;
2. a same-size reference directory with random weights (the step time does not depend on the weights' values);
3. `megaslm score` fills a reference cache for the SLM-cached run (its tokens/s is printed too);
4. three fresh processes, one per variant, each building the real `Trainer` (DeepSpeed ZeRO-2, world of one),
   running --warmup steps, resetting the peak-memory mark, then --steps timed steps.
Printed per variant: median tokens/s, MFU (the trainer's: 6N + attention, plus 2N of the reference forward when
online, over the device's peak), peak memory of the timed steps (torch.cuda.max_memory_allocated; peak RSS on
the CPU), and step time relative to CLM. Results also go to OUT/bench_gpu.json and OUT/bench_gpu.md.
The optimizer is torch's AdamW (DeepSpeed's `torch_adam`), so no CUDA extension has to compile; --fused-adam
asks for DeepSpeed's FusedAdam instead (JIT-built with nvcc).
"""

from __future__ import annotations

import argparse
import json
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
VARIANTS = ("clm", "slm_online", "slm_cached")
GIB = 2**30


def say(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data and models
def tokenizer_dir(root: Path, text: Path) -> tuple[str, str]:
    """(tokenizer directory, description): Mistral's v1 SentencePiece model if installed, else one trained here."""
    try:
        import mistral_common

        src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        if src.is_file():
            (root / "tok").mkdir(exist_ok=True)
            shutil.copy(src, root / "tok" / "tokenizer.model")
            return str(root / "tok"), "Mistral v1 SentencePiece (32000)"
    except ImportError:
        pass
    from megaslm.data.tokenizer import train_tokenizer

    return train_tokenizer([str(text)], 4000, str(root / "tok")), "trained here (4000; mistral-common not installed)"


def make_shards(root: Path, tokens_needed: int) -> tuple[str, str, str]:
    from megaslm.data.corpus import clean_documents, noisy_documents, write_jsonl
    from megaslm.data.prepare import prepare
    from megaslm.errors import UserError

    text = root / "text.jsonl"
    budget = max(200_000, 5 * tokens_needed)  # ~3.5-4 bytes per token for this text; a margin on top
    try:  # web-like text where the machine has Debian docs; docstrings alone otherwise
        noisy = list(noisy_documents(budget // 2, seed=0))
    except UserError:
        noisy = []
    docs = list(clean_documents(budget - sum(len(d["text"]) for d in noisy), seed=0)) + noisy
    write_jsonl(docs, str(text))
    tok, what = tokenizer_dir(root, text)
    meta = prepare([str(text)], tok, str(root / "shards"))
    return tok, str(root / "shards"), f"{meta['num_tokens']:,} tokens, tokenizer {what}"


def make_reference(root: Path, tok: str, preset: str, dtype: str) -> str:
    """A same-size reference directory with random weights, saved in the training precision."""
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    t = load_tokenizer(tok)
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    lm = AutoModelForCausalLM.from_config(preset_config(preset, t.vocab_size, eos_id=t.eos_id), dtype=torch_dtype)
    lm.save_pretrained(root / "ref")
    t.save_pretrained(str(root / "ref"))
    return str(root / "ref")


def write_configs(root: Path, a, shards: str, ref: str) -> dict[str, Path]:
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    if not a.fused_adam:
        ds["optimizer"] = {"type": "AdamW", "params": {"torch_adam": True}}  # nothing to compile
    (root / "ds.json").write_text(json.dumps(ds))
    paths = {}
    for v in VARIANTS:
        cfg = {"run": {"dir": str(root / "runs" / v)}, "model": {"preset": a.preset, "dtype": a.dtype},
               "data": {"train": shards},
               "train": {"steps": a.warmup + a.steps, "seq_len": a.seq_len, "micro_batch_size": a.micro_batch,
                         "warmup_steps": 0},
               "deepspeed": {"config": str(root / "ds.json")}, "wandb": {"mode": "disabled"},
               "objective": "clm" if v == "clm" else "slm", "slm": {"ratio": 0.6, "scope": "global"}}
        if v == "slm_online":
            cfg["reference"] = {"path": ref, "placement": "replicated"}
        if v == "slm_cached":
            cfg["reference"] = {"path": ref, "cache": str(root / "cache")}
        paths[v] = root / f"{v}.yaml"
        paths[v].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


# ----------------------------------------------------------------------------------------------- one variant
def worker(config: str, warmup: int, steps: int, result: str) -> None:
    """In a fresh process: the real Trainer, warm-up steps, then timed steps with the peak-memory mark reset."""
    import torch
    import torch.distributed as dist

    from megaslm.config import load_config
    from megaslm.launch import build_trainer

    cuda = torch.cuda.is_available()
    trainer = build_trainer(load_config(config))
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        sys.path.insert(0, str(REPO / "bench"))
        from _memory import reset_peak

        reset_peak()
    recs = [trainer.train_step() for _ in range(steps)]
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        from _memory import peak_bytes

        peak = peak_bytes()

    def med(k):
        return statistics.median(r[k] for r in recs) if all(r.get(k) is not None for r in recs) else None

    out = {"tokens_per_s": med("tokens_per_s"), "step_time": med("step_time"), "mfu": med("mfu"),
           "tflops_per_device": med("tflops_per_device"), "peak_bytes": peak, "cuda": cuda,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "loss": recs[-1]["loss"],
           "selected_frac": med("selected_frac"), "params": trainer.summary["params"],
           "reference_placement": trainer.run_info.get("reference_placement")}
    Path(result).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def run_child(args: list[str], env: dict, what: str, log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = log.read_text()[-4000:]
        sys.exit(f"bench_gpu: {what} failed with exit code {res.returncode}; log {log}:\n{tail}")
    return time.time() - t0


# ----------------------------------------------------------------------------------------------- report
def table(results: dict, a, data_desc: str, score_tps: float) -> str:
    clm = results["clm"]
    unit = "GiB (max_memory_allocated)" if clm["cuda"] else "GiB (peak RSS)"
    lines = [f"bench_gpu: {a.preset}, {a.dtype}, seq {a.seq_len} x micro-batch {a.micro_batch}, ZeRO-2, one "
             f"{clm['device']}, {a.steps} timed steps after {a.warmup} warm-up; data {data_desc}",
             f"| variant | tokens/s | MFU | peak memory {unit} | step time / CLM |", "|---|---|---|---|---|"]
    for v in VARIANTS:
        r = results[v]
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no GPU peak)"
        lines.append(f"| {v} | {r['tokens_per_s']:,.0f} | {mfu} | {r['peak_bytes'] / GIB:.2f} | "
                     f"{r['step_time'] / clm['step_time']:.3f} |")
    lines.append(f"scoring (megaslm score, reference forward only): {score_tps:,.0f} tokens/s")
    lines.append(f"SLM/CLM step time: online {results['slm_online']['step_time'] / clm['step_time']:.3f}, "
                 f"cached {results['slm_cached']['step_time'] / clm['step_time']:.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny preset, seq 128 x 2, 2 steps: a check of the code path")
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fused-adam", action="store_true", help="DeepSpeed FusedAdam (compiled with nvcc on first use)")
    ap.add_argument("--out", default=None, help="keep data, runs and results here (default: a temporary directory)")
    ap.add_argument("--worker", nargs=4, metavar=("CONFIG", "WARMUP", "STEPS", "RESULT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.tiny:
        a.preset, a.seq_len, a.micro_batch, a.warmup, a.steps = "tiny", 128, 2, 1, 2
    a.dtype = "bf16" if a.device == "cuda" else "fp32"
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), a.worker[3])
        return 0
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False). This benchmark needs one GPU; "
              "`python bench/bench_gpu.py --device cpu --tiny` checks the same code path on the CPU.",
              file=sys.stderr)
        return 2
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if a.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp).resolve()
        root.mkdir(parents=True, exist_ok=True)
        need = (a.warmup + a.steps + 2) * a.micro_batch * (a.seq_len + 1)
        say(f"1/4 text and token shards (at least {need:,} tokens)")
        tok, shards, data_desc = make_shards(root, need)
        say(f"    {data_desc}")
        say(f"2/4 a same-size random reference ({a.preset}, {a.dtype})")
        ref = make_reference(root, tok, a.preset, a.dtype)
        cfgs = write_configs(root, a, shards, ref)
        say("3/4 megaslm score (the reference cache for slm_cached)")
        with open(root / "shards" / "meta.json") as f:
            scored = json.load(f)["num_tokens"]
        dt = run_child(["-m", "megaslm.cli", "score", str(cfgs["slm_cached"])], env, "megaslm score",
                       root / "score.log")
        score_tps = scored / dt  # includes start-up and loading: a lower bound on the scoring rate
        results = {}
        for i, v in enumerate(VARIANTS):
            say(f"4/4 [{i + 1}/{len(VARIANTS)}] {v}: {a.warmup} warm-up + {a.steps} timed steps")
            out = root / f"{v}.json"
            run_child([__file__, "--worker", str(cfgs[v]), str(a.warmup), str(a.steps), str(out)], env, v,
                      root / f"{v}.log")
            results[v] = json.loads(out.read_text())
        text = table(results, a, data_desc, score_tps)
        print(text)
        if a.out:
            (root / "bench_gpu.json").write_text(json.dumps({"args": vars(a), "results": results,
                                                             "score_tokens_per_s": score_tps}, indent=1))
            (root / "bench_gpu.md").write_text(text + "\n")
    say(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
