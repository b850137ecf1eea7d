"""Objectives compared on the demo corpora: CLM, Rho-1 top-k, soft weights, reference-free `score: loss`, an EMA
self-reference, an ensemble of two references, a start-step schedule, ESLM's entropy top-k and CVaR, and ssToken's
retrospective excess loss with an EMA history.

Two settings, each on the same tokenizer and shards (reference data: clean prose; training data: the noisy mix
of clean prose and Debian changelogs; held-out: clean prose):
- scratch:   references trained from scratch on clean text; every variant starts from the same random init
             (train.seed) and sees the same token order for the same number of steps (the demo's setting);
- continual: the paper's setting: a base model trained on the noisy mix; the references are that base
             fine-tuned on clean text; every variant continues from the base.
For each variant: the held-out clean loss at the end, and the first evaluation step at which it reaches CLM's
final held-out loss (the speed-up over CLM is final step / that step). Several seeds change the init and the
data order of the variants (references are trained once). Output: DIR/bench_objectives.{md,json,png}.

    python bench/bench_objectives.py --out /tmp/bench_obj --seeds 2 [--steps 60] [--corpus-from DEMO_DIR]

Every run is a real `megaslm train` (DeepSpeed ZeRO-2, one process: the loss is exact across data-parallel
ranks, so one rank with micro-batch 8 is the same run as the demo's two ranks with micro-batch 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent


def sh(*args: str, log: Path | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled"}
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log or os.devnull, "w") as f:
        res = subprocess.run([PY, "-m", "megaslm.cli", *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise SystemExit(f"megaslm {' '.join(args)} failed ({res.returncode}); log: {log}")


def corpora(out: Path, demo: str | None) -> dict:
    """Shards and tokenizer: those of an existing `megaslm demo --quick` directory, or built like it."""
    if demo:
        d = Path(demo)
        return {"tok": str(d / "tokenizer"), **{k: str(d / "shards" / k) for k in ("clean", "noisy", "valid")}}
    from megaslm.data.corpus import build_demo_corpora

    p = build_demo_corpora(str(out / "corpus"), 300_000, 400_000, 60_000, seed=0)
    tok = out / "tokenizer"
    sh("tokenizer", "train", "--input", p["clean_train"], p["noisy_train_clean"], p["noisy_train_noise"],
       "--vocab-size", "1000", "--out", str(tok))
    shards = out / "shards"
    for name, inputs in (("clean", [p["clean_train"]]), ("noisy", [p["noisy_train_clean"], p["noisy_train_noise"]]),
                         ("valid", [p["clean_valid"]])):
        sh("prepare", "--input", *inputs, "--tokenizer", str(tok), "--out", str(shards / name))
    return {"tok": str(tok), **{k: str(shards / k) for k in ("clean", "noisy", "valid")}}


class Runner:
    def __init__(self, out: Path, data: dict, steps: int, eval_every: int):
        self.out, self.data, self.steps, self.eval_every = out, data, steps, eval_every
        self.n_runs, self.t0 = 0, time.time()

    def train(self, name: str, train_data: str, steps: int, seed: int = 0, init: str | None = None,
              **sections) -> list[dict]:
        run = self.out / "runs" / name
        if (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "latest_complete").is_file():
            return _metrics(run)  # done in an earlier invocation
        cfg = {"run": {"dir": str(run)}, "model": {"preset": "tiny", **({"init_from": init} if init else {})},
               "data": {"train": train_data, "valid": self.data["valid"], "tokenizer": self.data["tok"],
                        "valid_sequences": 16},
               "train": {"steps": steps, "seq_len": 64, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 5,
                         "eval_every": self.eval_every, "log_every": 5, "seed": seed, "save_every": 0,
                         "keep_checkpoints": 1},
               "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "disabled"}}
        for sec, over in sections.items():
            cfg[sec] = {**cfg.get(sec, {}), **over} if isinstance(over, dict) else over
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t = time.time()
        sh("train", str(path), log=self.out / "logs" / f"{name}.log")
        self.n_runs += 1
        print(f"[bench] {name}: {steps} steps in {time.time() - t:.0f} s (elapsed {time.time() - self.t0:.0f} s)",
              flush=True)
        return _metrics(run)

    def export(self, name: str) -> str:
        dst = self.out / "models" / name
        if not (dst / "config.json").is_file():
            sh("export", str(self.out / "runs" / name), "--out", str(dst), log=self.out / "logs" / f"export_{name}.log")
        return str(dst)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def variants(ref_a: str, ref_b: str, steps: int) -> dict[str, dict]:
    """Config sections of each variant (the reference, where one is used, is `ref_a`)."""
    slm = {"objective": "slm", "reference": {"path": ref_a}}
    return {
        "clm": {"objective": "clm"},
        "topk_0.6": {**slm, "slm": {"ratio": 0.6}},
        "soft_0.6": {**slm, "slm": {"ratio": 0.6, "weighting": "soft", "temperature": 0.5}},
        "score_loss": {"objective": "slm", "slm": {"ratio": 0.6, "score": "loss"}},
        "ema_0.95": {"objective": "slm", "slm": {"ratio": 0.6}, "reference": {"ema_decay": 0.95}},
        "ensemble_mean": {"objective": "slm", "slm": {"ratio": 0.6}, "reference": {"path": [ref_a, ref_b]}},
        "start_step": {**slm, "slm": {"ratio": 0.6, "start_step": steps // 4, "ratio_warmup_steps": steps // 4}},
        # ESLM (arXiv 2505.19893): the top 60% by predictive entropy (value-at-risk), and its CVaR weighting.
        "entropy_topk_0.6": {"objective": "slm", "slm": {"ratio": 0.6, "score": "entropy"}},
        "entropy_cvar_0.6": {"objective": "slm", "slm": {"ratio": 0.6, "score": "entropy", "weighting": "cvar"}},
        # ssToken (arXiv 2510.18250): retrospective excess loss, history = an EMA of the trained model.
        "retro_ema_0.95": {"objective": "slm", "slm": {"ratio": 0.6, "score": "retrospective"},
                           "reference": {"ema_decay": 0.95}},
        # ... and history = the initial model, fixed (continual: the base before this training, the paper's main form).
        "retro_init": {"objective": "slm", "slm": {"ratio": 0.6, "score": "retrospective"},
                       "reference": {"ema_decay": 1.0}},
    }


def setting(r: Runner, label: str, train_data: str, ref_a: str, ref_b: str, seeds: int, init: str | None,
            only: list[str] | None = None) -> dict:
    out = {}
    for seed in range(seeds):
        for name, sec in variants(ref_a, ref_b, r.steps).items():
            if only and name not in only and name != "clm":  # CLM is every comparison's baseline
                continue
            recs = r.train(f"{label}_{name}_s{seed}", train_data, r.steps, seed=seed + 1, init=init, **sec)
            out.setdefault(name, []).append([(x["step"], x["val_loss"]) for x in recs if x.get("val_loss") is not None])
    return out


def summarize(curves: dict) -> list[dict]:
    """Per variant: mean final held-out loss over seeds, its gap to CLM, and the step reaching CLM's final loss."""
    rows = []
    for name, per_seed in curves.items():
        finals, reach = [], []
        for s, curve in enumerate(per_seed):
            target = curves["clm"][s][-1][1]
            finals.append(curve[-1][1])
            reach.append(next((st for st, v in curve if v <= target), None))
        rows.append({"variant": name, "final": sum(finals) / len(finals), "finals": finals,
                     "delta_vs_clm": sum(finals) / len(finals) - sum(c[-1][1] for c in curves["clm"]) / len(finals),
                     "reach_step": reach})
    return rows


def plot(all_curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_curves), figsize=(6.5 * len(all_curves), 4.5))
    for ax, (label, curves) in zip(list(axes) if len(all_curves) > 1 else [axes], all_curves.items()):
        for name, per_seed in curves.items():
            steps = [st for st, _ in per_seed[0]]
            mean = [sum(c[i][1] for c in per_seed) / len(per_seed) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", ms=3, label=name, lw=2.2 if name in ("clm", "topk_0.6") else 1.2)
        ax.set_title(f"{label}: held-out clean loss (mean of {len(next(iter(curves.values())))} seeds)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats/token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(label: str, rows: list[dict], steps: int) -> list[str]:
    lines = [f"### {label}", "", "| variant | held-out loss at end (mean) | per seed | vs CLM (nats) | "
             "step reaching CLM's final loss (per seed) |", "|---|---|---|---|---|"]
    for r in rows:
        reach = ", ".join("-" if x is None else str(x) for x in r["reach_step"])
        lines.append(f"| {r['variant']} | {r['final']:.4f} | {', '.join(f'{x:.4f}' for x in r['finals'])} | "
                     f"{r['delta_vs_clm']:+.4f} | {reach} (of {steps}) |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_objectives_out")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ref-steps", type=int, default=60)
    ap.add_argument("--base-steps", type=int, default=60, help="continual: steps of the base model on the noisy mix")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--corpus-from", default=None, help="reuse the shards of a `megaslm demo --quick` directory")
    ap.add_argument("--settings", default="scratch,continual")
    ap.add_argument("--variants", default="", help="comma-separated variants to run (default: all; clm always runs)")
    a = ap.parse_args()
    only = [v for v in a.variants.split(",") if v] or None
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = corpora(out, a.corpus_from)
    r = Runner(out, data, a.steps, a.eval_every)
    # The trained references are needed only by the variants that name them (reference.path).
    refs = only is None or any("path" in variants("a", "b", a.steps)[v].get("reference", {}) for v in only)

    def reference(name: str, seed: int, init: str | None = None) -> str | None:
        if not refs:
            return None
        r.train(name, data["clean"], a.ref_steps, seed=seed, init=init)
        return r.export(name)

    all_curves = {}
    if "scratch" in a.settings:
        ref_a, ref_b = reference("scratch_ref_a", 100), reference("scratch_ref_b", 101)
        all_curves["scratch"] = setting(r, "scratch", data["noisy"], ref_a, ref_b, a.seeds, None, only)
    if "continual" in a.settings:
        r.train("cont_base", data["noisy"], a.base_steps, seed=200)
        base = r.export("cont_base")
        ref_a, ref_b = reference("cont_ref_a", 201, base), reference("cont_ref_b", 202, base)
        all_curves["continual"] = setting(r, "cont", data["noisy"], ref_a, ref_b, a.seeds, base, only)
    summary = {label: summarize(c) for label, c in all_curves.items()}
    plot(all_curves, out / "bench_objectives.png")
    lines = ["# bench_objectives", "", f"{a.seeds} seed(s); {a.steps} steps per variant (seq 64 x 8 sequences, "
             f"tiny Llama, ZeRO-2, 1 process); references {a.ref_steps} steps; continual base {a.base_steps} steps; "
             f"evaluation every {a.eval_every} steps on 16 held-out clean sequences; {r.n_runs} runs in "
             f"{time.time() - r.t0:.0f} s.", ""]
    for label, rows in summary.items():
        lines += table(label, rows, a.steps)
    lines.append("![held-out loss](bench_objectives.png)")
    (out / "bench_objectives.md").write_text("\n".join(lines) + "\n")
    (out / "bench_objectives.json").write_text(json.dumps({"curves": all_curves, "summary": summary}, indent=1))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
