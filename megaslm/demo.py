"""`megaslm demo`: the Rho-1 experiment, end to end, on a CPU, with text that ships on this machine.

1. clean corpus (docstrings of sympy / networkx / mpmath) -> tokenizer -> train the reference model (CLM)
   -> export it to a Hugging Face directory;
2. noisy corpus (more clean prose, disjoint, mixed with Debian changelogs) -> a CLM baseline and an SLM model from
   the same init, on the same token order and budget;
3. `megaslm analyze tokens` (final SLM model vs the reference on the noisy corpus) and `megaslm analyze dynamics`
   (every SLM checkpoint) under analysis/; `megaslm report` over the three runs: report.md, val_loss.png and the
   other plots in the output directory.
Every training run uses the real DeepSpeed engine (ZeRO-2) across 2 processes over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megaslm.parallel.dist import free_port

FULL = dict(clean_bytes=2_000_000, noisy_bytes=3_000_000, valid_bytes=200_000, vocab=2000, seq_len=128,
            micro_batch=8, ref_steps=200, steps=200, eval_every=20, valid_sequences=64, analyze_docs=10,
            dynamics_tokens=16384)
QUICK = dict(clean_bytes=300_000, noisy_bytes=400_000, valid_bytes=60_000, vocab=1000, seq_len=64,
             micro_batch=4, ref_steps=20, steps=20, eval_every=10, valid_sequences=16, analyze_docs=5,
             dynamics_tokens=4096)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _megaslm(*args: str) -> None:
    cmd = [sys.executable, "-m", "megaslm.cli", *args]
    subprocess.run(cmd, check=True)


def _train(cfg: dict, path: Path, nproc: int = 2) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "megaslm.cli", "train", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "WANDB_SILENT": "true"}
    subprocess.run(cmd, check=True, env=env)


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_demo(out: str = "demo_run", quick: bool = False, steps: int | None = None) -> int:
    from megaslm.data.corpus import build_demo_corpora

    p = dict(QUICK if quick else FULL)
    if steps:
        p["steps"] = p["ref_steps"] = steps
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    _say(f"1/6 building corpora from text on this machine into {root / 'corpus'}")
    paths = build_demo_corpora(str(root / "corpus"), p["clean_bytes"], p["noisy_bytes"], p["valid_bytes"], seed=0)
    clean, noisy_clean, noisy_noise, valid = (paths["clean_train"], paths["noisy_train_clean"],
                                              paths["noisy_train_noise"], paths["clean_valid"])

    _say(f"2/6 training a SentencePiece tokenizer (vocab {p['vocab']})")
    tok = root / "tokenizer"
    _megaslm("tokenizer", "train", "--input", clean, noisy_clean, noisy_noise, "--vocab-size", str(p["vocab"]),
             "--out", str(tok))

    _say("3/6 preparing token shards")
    shards = root / "shards"
    _megaslm("prepare", "--input", clean, "--tokenizer", str(tok), "--out", str(shards / "clean"))
    _megaslm("prepare", "--input", noisy_clean, noisy_noise, "--tokenizer", str(tok), "--out", str(shards / "noisy"))
    _megaslm("prepare", "--input", valid, "--tokenizer", str(tok), "--out", str(shards / "valid"))

    base = {
        "model": {"preset": "tiny"},
        "data": {"valid": str(shards / "valid"), "tokenizer": str(tok), "valid_sequences": p["valid_sequences"]},
        "train": {"seq_len": p["seq_len"], "micro_batch_size": p["micro_batch"], "lr": 2e-3, "warmup_steps": 10,
                  "eval_every": p["eval_every"], "log_every": 5, "seed": 0},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "wandb": {"mode": "offline", "project": "megaslm-demo"},
    }

    def cfg(name: str, **over) -> dict:
        c = json.loads(json.dumps(base))
        c["run"] = {"dir": str(root / "runs" / name), "name": name}
        for k, v in over.items():
            sec, key = k.split("__")
            c.setdefault(sec, {})[key] = v
        return c

    _say(f"4/6 step 1 of Rho-1: reference model, CLM on clean text ({p['ref_steps']} steps, 2 processes, ZeRO-2)")
    ref_cfg = cfg("reference", data__train=str(shards / "clean"), train__steps=p["ref_steps"])
    _train(ref_cfg, root / "reference.yaml")
    ref_dir = root / "reference_hf"
    _megaslm("export", str(root / "runs" / "reference"), "--out", str(ref_dir))

    _say(f"5/6 step 3 of Rho-1: CLM baseline and SLM (ratio 0.6) on the noisy corpus ({p['steps']} steps each)")
    common = dict(data__train=str(shards / "noisy"), data__track_sources=True, train__steps=p["steps"])
    _train(cfg("baseline_clm", **common), root / "baseline_clm.yaml")
    # The SLM run keeps a checkpoint every fifth of the run for `megaslm analyze dynamics`.
    slm_cfg = {**cfg("slm", **common, train__keep_checkpoints=0, train__save_every=max(1, p["steps"] // 5)),
               "objective": "slm", "slm": {"ratio": 0.6, "scope": "global"},
               "reference": {"path": str(ref_dir), "placement": "auto"}}
    _train(slm_cfg, root / "slm.yaml")
    _megaslm("export", str(root / "runs" / "slm"), "--out", str(root / "slm_hf"))

    _say("6/6 looking at the selection (megaslm analyze), downstream tasks (megaslm eval), the report")
    analysis = _analyze(root, p)
    analysis["eval"] = _evaluate(root, quick)
    report = write_report(root, p, time.time() - t_start, analysis)
    _say(f"done in {time.time() - t_start:.0f} s. Report: {report}")
    _say(f"plot: {root / 'val_loss.png'}; runs: {root / 'runs'}; exported SLM model: {root / 'slm_hf'}")
    return 0


def _demo_preface(root: Path, p: dict, val: dict, elapsed: float, analysis: dict) -> list[str]:
    def final(name):
        return val[name][-1][1] if val[name] else float("nan")

    b, s = final("baseline_clm"), final("slm")
    verdict = ("lower" if s < b else "higher") + f" than the baseline's by {abs(b - s):.4f} nats/token"
    lines = [
        f"Wall time {elapsed:.0f} s. Tiny Llama ({p['seq_len']} tokens/sequence, micro-batch {p['micro_batch']} x 2 "
        f"processes, ZeRO-2, gloo). Reference: {p['ref_steps']} steps on clean prose; CLM and SLM: {p['steps']} "
        "steps each on the noisy corpus, same init and same token order.", "",
        "## Held-out loss on clean text (lower is better)", "",
        "| step | baseline_clm | slm |", "|---|---|---|",
    ]
    steps_b = dict(val["baseline_clm"])
    lines += [f"| {st} | {steps_b.get(st, float('nan')):.4f} | {v:.4f} |" for st, v in val["slm"]]
    lines += ["", f"Final: CLM baseline {b:.4f}, SLM {s:.4f}: SLM is {verdict}. "
              f"Reference model on the same held-out text: {final('reference'):.4f}.", ""]
    tok = analysis.get("tokens")
    if tok:
        lines += ["## Which tokens the reference rejects (`megaslm analyze tokens`, final SLM model)", "",
                  "| source | tokens | selected fraction | mean loss | mean ref loss |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {v['tokens']} | {v['selected_frac']:.3f} | {v['mean_loss']:.4f} | "
                  f"{v['mean_ref_loss']:.4f} |" for name, v in tok["sources"].items()]
        lines += ["", "Every token, coloured by excess loss: [analysis/tokens/tokens.html](analysis/tokens/tokens.html).",
                  ""]
    dyn = analysis.get("dynamics")
    if dyn:
        lines += ["## Token-loss dynamics of the SLM run (`megaslm analyze dynamics`)", "",
                  f"Threshold {dyn['threshold']:.3f} nats; tokens per category: "
                  + ", ".join(f"{c} {n}" for c, n in dyn["counts"].items()) + ".", "",
                  "![dynamics](analysis/dynamics/dynamics.png)", ""]
    if analysis.get("eval"):
        lines += _eval_lines(analysis["eval"])
    lines += ["These are figures from one short run of a ~1M-parameter model; read them as a smoke test of the "
              "pipeline, not as evidence about Rho-1 at scale.", ""]
    return lines


# `megaslm eval` on the CLM and SLM models: two offline tasks, the first examples only (a smoke test of the
# evaluation path at this scale: a ~1M-parameter model sits near chance on accuracy; bpb still moves). The tasks
# are loaded once for both models; GSM8K's 8-shot prompts fill the tiny model's 2048-token context.
EVAL_TASKS = ["arc_easy", "gsm8k_bpb"]
EVAL_LIMIT = {False: 20, True: 8}


def _evaluate(root: Path, quick: bool) -> dict | None:
    from megaslm.atomic import write_json
    from megaslm.errors import UserError
    from megaslm.eval.run import load_model, make_lm, run_tasks
    from megaslm.eval.tasks import load_tasks

    limit = EVAL_LIMIT[quick]
    try:
        loaded = load_tasks(EVAL_TASKS)
    except UserError as e:  # e.g. the evaluation data are not installed: the demo's other results stand
        _say(f"skipping the downstream evaluation: {e}")
        return None
    out = {}
    for name in ("baseline_clm", "slm"):
        t0 = time.time()
        run = root / "runs" / name
        lm, tok, _, tag = load_model(str(run), None)
        res = {"tasks": run_tasks(make_lm(lm, tok), loaded, limit), "model": str(run), "limit": limit,
               "num_fewshot": None, "tag": tag, "seconds": round(time.time() - t0, 2)}
        (root / "eval" / name).mkdir(parents=True, exist_ok=True)
        write_json(root / "eval" / name / "results.json", res)  # as `megaslm eval RUN --out DIR` writes it
        out[name] = res
    return out


def _eval_lines(ev: dict) -> list[str]:
    first = next(iter(ev.values()))
    limit = first["limit"]
    cols = [(t, m) for t, row in first["tasks"].items() for m in row if m != "n"]
    lines = [f"## Downstream tasks (`megaslm eval`, first {limit} examples each)", "",
             "| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " | seconds |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, res in ev.items():
        lines.append(f"| {name} | " + " | ".join(f"{res['tasks'][t][m]:.4f}" for t, m in cols)
                     + f" | {res['seconds']:.1f} |")
    lines += ["", "acc / acc_norm: higher is better (chance: 0.25); bpb: bits per byte of the gold GSM8K solution "
              "given its 8-shot prompt, lower is better. Results: eval/<model>/results.json.", ""]
    return lines


def _analyze(root: Path, p: dict) -> dict:
    """`megaslm analyze tokens` and `analyze dynamics` on the demo's runs (their pages go under analysis/)."""
    from megaslm.analyze.dynamics import analyze_dynamics
    from megaslm.analyze.tokens import analyze_tokens

    out = root / "analysis"
    tokens = analyze_tokens(str(root / "slm_hf"), str(root / "reference_hf"), [str(root / "shards" / "noisy")],
                            str(out / "tokens"), docs=p["analyze_docs"], seq_len=p["seq_len"], ratio=0.6)
    dynamics = analyze_dynamics(str(root / "runs" / "slm"), [str(root / "shards" / "valid")], str(out / "dynamics"),
                                reference=str(root / "reference_hf"), n_tokens=p["dynamics_tokens"])
    return {"tokens": tokens, "dynamics": dynamics}


def write_report(root: Path, p: dict, elapsed: float, analysis: dict | None = None) -> Path:
    """report.md, the plots (val_loss.png among them) and report.json, built by `megaslm report`."""
    from megaslm.report import build_report

    runs = {name: _read_metrics(root / "runs" / name) for name in ("reference", "baseline_clm", "slm")}
    val = {name: [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
           for name, recs in runs.items()}
    preface = _demo_preface(root, p, val, elapsed, analysis or {})
    built = build_report([str(root / "runs" / n) for n in ("baseline_clm", "slm", "reference")], str(root),
                         title="megaslm demo: Rho-1 on a CPU", preface=preface)
    per_source = built["runs"]["slm"]["per_source_selected"]
    final = {name: (v[-1][1] if v else float("nan")) for name, v in val.items()}
    (root / "report.json").write_text(json.dumps({**json.loads((root / "report.json").read_text()), "val": val,
                                                   "per_source_selected": per_source, "final": final,
                                                   "eval": {name: {"tasks": r["tasks"], "seconds": r["seconds"]}
                                                            for name, r in ((analysis or {}).get("eval") or {}).items()},
                                                   "elapsed_s": elapsed}, indent=2))
    return built["path"]
