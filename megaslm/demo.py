"""`megaslm demo`: the Rho-1 experiment, end to end, on a CPU, with text that ships on this machine.

1. clean corpus (docstrings of sympy / networkx / mpmath) -> tokenizer -> train the reference model (CLM)
   -> export it to a Hugging Face directory;
2. noisy corpus (more clean prose, disjoint, mixed with Debian changelogs) -> a CLM baseline and an SLM model from
   the same init, on the same token order and budget;
3. `megaslm analyze tokens` (final SLM model vs the reference on the noisy corpus) and `megaslm analyze dynamics`
   (every SLM checkpoint) under analysis/; `megaslm report` over the three runs: report.md, val_loss.png and the
   other plots in the output directory.
Every training run uses the real DeepSpeed engine (ZeRO-2) across 2 processes over gloo.

Each variant has its own default directory (`demo_run/`, `demo_quick/`). DIR/demo.json records which demo the
directory holds (variant, seed, settings), the phases done and the time spent. A demo refuses, before writing
anything, a directory that holds another variant's or another configuration's run, or that is not empty and
holds no demo. Run again on its own directory, a demo continues from the first phase not done (an interrupted
training resumes from its checkpoint); a finished one is left as it is.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from megaslm.errors import UserError
from megaslm.phases import (Console, Job, StepFailed, differences, megaslm as _megaslm, read_metrics as _read_metrics,
                            read_state, run_phases, train as _train)

__all__ = ["StepFailed", "run_demo", "demo_settings", "claim"]

FULL = dict(clean_bytes=2_000_000, noisy_bytes=3_000_000, valid_bytes=200_000, vocab=2000, seq_len=128,
            micro_batch=8, ref_steps=200, steps=200, eval_every=20, valid_sequences=64, analyze_docs=10,
            dynamics_tokens=16384)
# The quick demo's settings were chosen to show the effect, and checked on seeds 0, 1 and 2 (README, "The demo"):
# 20 steps on 64-token sequences (the earlier setting) left SLM above CLM; from about 100 steps of 128 x 8 it is
# below at every evaluation.
QUICK = dict(clean_bytes=1_000_000, noisy_bytes=1_500_000, valid_bytes=100_000, vocab=1000, seq_len=128,
             micro_batch=8, ref_steps=100, steps=100, eval_every=20, valid_sequences=32, analyze_docs=5,
             dynamics_tokens=4096)
VARIANTS = {"full": FULL, "quick": QUICK}
# Each variant has its own default directory, so that one never overwrites the other's run.
DEFAULT_DIRS = {"full": "demo_run", "quick": "demo_quick"}
STATE = "demo.json"  # what the directory holds: variant, seed, settings, the phases done, the time spent
CONSOLE = Console("demo")
_say, _phase = CONSOLE.say, CONSOLE.phase
Demo = Job


# ---------------------------------------------------------------------------------------------- the directory
def demo_settings(quick: bool = False, steps: int | None = None, seed: int = 0) -> dict:
    """What identifies a demo run: its variant, its seed and every setting (a directory holds one of them)."""
    variant = "quick" if quick else "full"
    p = dict(VARIANTS[variant])
    if steps:
        p["steps"] = p["ref_steps"] = steps
    return {"variant": variant, "seed": seed, "params": p}


def _describe(ident: dict) -> str:
    return f"the {ident['variant']} demo (seed {ident['seed']})"


def claim(root: Path, ident: dict) -> dict:
    """The state of `root` for the demo `ident`, checked before anything is written: {} for a new or empty
    directory, the saved state for an unfinished or finished run of the same demo. A directory holding another
    variant's run, another configuration's, or files that are not a demo's is refused (UserError)."""
    state = read_state(root, STATE, "megaslm demo")
    if state is None:
        return {}
    here, there = _describe(ident), _describe(state)
    if state.get("variant") != ident["variant"]:
        default = DEFAULT_DIRS[ident["variant"]]
        flag = " --quick" if ident["variant"] == "quick" else ""
        raise UserError(f"--out {root}: holds {there}, not {here}; `megaslm demo{flag}` writes to ./{default} by "
                        f"default: pass --out with another directory, or remove this one")
    diffs = differences(state, ident)
    if diffs:
        raise UserError(f"--out {root}: holds {there} with other settings ({diffs}); pass --out with a new "
                        f"directory for this one, or remove that one")
    return state


# ------------------------------------------------------------------------------------------------- the phases
def phase_corpora(d: Demo) -> None:
    from megaslm.data.corpus import build_demo_corpora

    _phase(f"building corpora from text on this machine into {d.path('corpus')}")
    build_demo_corpora(d.path("corpus"), d.p["clean_bytes"], d.p["noisy_bytes"], d.p["valid_bytes"], seed=d.seed)


def _corpus(d: Demo, name: str) -> str:
    return d.path("corpus", f"{name}.jsonl")


def phase_tokenizer(d: Demo) -> None:
    _phase(f"training a SentencePiece tokenizer (vocab {d.p['vocab']})")
    _megaslm("tokenizer", "train", "--input", _corpus(d, "clean_train"), _corpus(d, "noisy_train_clean"),
             _corpus(d, "noisy_train_noise"), "--vocab-size", str(d.p["vocab"]), "--out", d.path("tokenizer"))


def phase_shards(d: Demo) -> None:
    _phase("preparing token shards")
    tok = d.path("tokenizer")
    _megaslm("prepare", "--input", _corpus(d, "clean_train"), "--tokenizer", tok, "--out", d.path("shards", "clean"))
    _megaslm("prepare", "--input", _corpus(d, "noisy_train_clean"), _corpus(d, "noisy_train_noise"), "--tokenizer",
             tok, "--out", d.path("shards", "noisy"))
    _megaslm("prepare", "--input", _corpus(d, "clean_valid"), "--tokenizer", tok, "--out", d.path("shards", "valid"))


def run_config(d: Demo, name: str, **over) -> dict:
    """The training config of one demo run; `over` sets section__key entries."""
    p = d.p
    c = {
        "run": {"dir": d.path("runs", name), "name": name},
        "model": {"preset": "tiny"},
        "data": {"valid": d.path("shards", "valid"), "tokenizer": d.path("tokenizer"),
                 "valid_sequences": p["valid_sequences"]},
        "train": {"seq_len": p["seq_len"], "micro_batch_size": p["micro_batch"], "lr": p.get("lr", 2e-3),
                  "warmup_steps": p.get("warmup_steps", 10), "eval_every": p["eval_every"], "log_every": 5,
                  "seed": d.seed},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "wandb": {"mode": "offline", "project": "megaslm-demo"},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        c.setdefault(sec, {})[key] = v
    return c


def phase_reference(d: Demo) -> None:
    _phase(f"step 1 of Rho-1: reference model, CLM on clean text ({d.p['ref_steps']} steps, 2 processes, ZeRO-2)")
    _train(run_config(d, "reference", data__train=d.path("shards", "clean"), train__steps=d.p["ref_steps"]),
           d.root / "reference.yaml")
    _megaslm("export", d.path("runs", "reference"), "--out", d.path("reference_hf"))


def _noisy(d: Demo) -> dict:
    return dict(data__train=d.path("shards", "noisy"), data__track_sources=True, train__steps=d.p["steps"])


def phase_baseline(d: Demo) -> None:
    _phase(f"step 3 of Rho-1, baseline: CLM on the noisy corpus ({d.p['steps']} steps)")
    _train(run_config(d, "baseline_clm", **_noisy(d)), d.root / "baseline_clm.yaml")


def phase_slm(d: Demo) -> None:
    _phase(f"step 3 of Rho-1: SLM (ratio {d.p.get('ratio', 0.6)}) on the noisy corpus, same init, token order and "
         f"budget as the baseline ({d.p['steps']} steps)")
    # The SLM run keeps a checkpoint every fifth of the run for `megaslm analyze dynamics`.
    cfg = {**run_config(d, "slm", **_noisy(d), train__keep_checkpoints=0, train__save_every=max(1, d.p["steps"] // 5)),
           "objective": "slm", "slm": {"ratio": d.p.get("ratio", 0.6), "scope": "global"},
           "reference": {"path": d.path("reference_hf"), "placement": "auto"}}
    _train(cfg, d.root / "slm.yaml")
    _megaslm("export", d.path("runs", "slm"), "--out", d.path("slm_hf"))


def phase_analysis(d: Demo) -> None:
    import torch

    _phase("looking at the selection (megaslm analyze tokens, analyze dynamics)")
    # One thread, as each training process has (OMP_NUM_THREADS=1): on 2 cores shared with other jobs, two
    # threads made the scoring ten times slower (30 s against 2.9 s for the same 4 batches), since a thread
    # that loses its core stalls the other at every operation.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _analyze(d.root, d.p)
    finally:
        torch.set_num_threads(threads)


def phase_eval(d: Demo) -> None:
    _phase(f"downstream tasks (megaslm eval: {', '.join(EVAL_TASKS)}) on the CLM and SLM models")
    _evaluate(d.root, d.ident["variant"] == "quick")


def phase_report(d: Demo) -> None:
    _phase("writing the report (megaslm report)")
    report = write_report(d.root, d.p, d.elapsed(), _load_analysis(d.root))
    _say(f"done in {d.elapsed():.0f} s. Report: {report}")
    _say(f"plot: {d.root / 'val_loss.png'}; runs: {d.root / 'runs'}; exported SLM model: {d.root / 'slm_hf'}")


# In order; a phase that is done (recorded in demo.json) is skipped when the same demo is run again. The report's
# wall time counts every phase before it.
PHASES = [("corpora", phase_corpora), ("tokenizer", phase_tokenizer), ("shards", phase_shards),
          ("reference", phase_reference), ("baseline", phase_baseline), ("slm", phase_slm),
          ("analysis", phase_analysis), ("eval", phase_eval), ("report", phase_report)]


def run_demo(out: str | None = None, quick: bool = False, steps: int | None = None, seed: int = 0) -> int:
    t_start = time.time()
    ident = demo_settings(quick, steps, seed)
    root = Path(out or DEFAULT_DIRS[ident["variant"]]).resolve()
    state = claim(root, ident)
    if state.get("complete"):
        _say(f"{root} already holds {_describe(ident)}, finished in {state.get('elapsed_s', 0):.0f} s: report "
             f"{root / 'report.md'}. Nothing to do (remove the directory, or pass --out, to run it again)")
        return 0
    if state.get("phases_done"):
        _say(f"continuing {_describe(ident)} in {root} (done before: {', '.join(state['phases_done'])})")
    return run_phases(Job(root, ident, STATE, CONSOLE, state, t_start), PHASES)


def _machine() -> str:
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} CPU cores{load}"


def _demo_preface(root: Path, p: dict, val: dict, elapsed: float, analysis: dict) -> list[str]:
    def final(name):
        return val[name][-1][1] if val[name] else float("nan")

    b, s = final("baseline_clm"), final("slm")
    verdict = ("lower" if s < b else "higher") + f" than the baseline's by {abs(b - s):.4f} nats/token"
    lines = [
        f"Wall time {elapsed:.0f} s, every phase from the corpora to this report, on {_machine()}. Tiny Llama ({p['seq_len']} tokens/sequence, micro-batch {p['micro_batch']} x 2 "
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


def _load_analysis(root: Path) -> dict:
    """The summaries `analyze tokens`, `analyze dynamics` and `eval` wrote (the report phase may run in a later
    call)."""
    files = {"tokens": root / "analysis" / "tokens" / "summary.json",
             "dynamics": root / "analysis" / "dynamics" / "dynamics.json"}
    out = {k: json.loads(f.read_text()) for k, f in files.items() if f.is_file()}
    evals = {name: root / "eval" / name / "results.json" for name in ("baseline_clm", "slm")}
    if all(f.is_file() for f in evals.values()):
        out["eval"] = {name: json.loads(f.read_text()) for name, f in evals.items()}
    return out


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
