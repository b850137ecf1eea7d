"""`megaslm eval MODEL --tasks T1,T2 [--limit N] [--num-fewshot K] [--out DIR]`: lm-eval tasks on a model.

MODEL is a Hugging Face directory (e.g. from `megaslm export`) or a megaslm run directory (its latest verified
checkpoint, or `--tag`). Prints a table and writes DIR/results.json:

    {"tasks": {TASK: {METRIC: value, ..., "n": examples scored}}, "model": MODEL, "limit": N or null,
     "num_fewshot": K or null, "tag": checkpoint tag (run directories), "seconds": wall time}

Metrics are lm-eval's names without the filter suffix (`acc`, `acc_norm`, `bpb`, `exact_match`). With `--limit N`
each task scores the first N examples in its data's order. When MODEL is a run (or an export whose
megaslm_export.json names its run) the figures are also logged to that run's wandb as `eval/<task>/<metric>`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from megaslm.accelerator import set_accelerator
from megaslm.errors import UserError
from megaslm.eval.tasks import load_tasks, output_types, parse_tasks

DEFAULT_BATCH_TOKENS = 8192


def results_table(loaded: dict, raw: dict) -> dict[str, dict]:
    """{task: {metric: value, "n": examples}} from lm-eval's results (stderr entries dropped; a metric reported
    under one filter keeps its plain name, several filters give `metric_filter`)."""
    out = {}
    for task in loaded["tasks"]:
        res = raw["results"].get(task, {})
        keys = [k for k in res if "," in k and "_stderr" not in k]
        filters = {k.split(",", 1)[1] for k in keys}
        row = {}
        for k in keys:
            metric, flt = k.split(",", 1)
            v = res[k]
            if isinstance(v, (int, float)):
                row[metric if len(filters) == 1 else f"{metric}_{flt}"] = float(v)
        n = raw.get("n-samples", {}).get(task, {})
        row["n"] = int(n.get("effective", n.get("original", 0))) if isinstance(n, dict) else int(n or 0)
        out[task] = row
    return out


def run_tasks(lm, loaded: dict, limit: int | None) -> dict[str, dict]:
    """Every task of `loaded` through lm-eval's evaluator on `lm`; the same on every rank."""
    import lm_eval.api.task as lm_task
    from lm_eval.evaluator import evaluate

    # lm-eval draws a progress bar per task while building requests, on every rank: in a training log that is
    # noise (megaslm's own progress line reports the scoring, which is where the time goes)
    bar = lm_task.tqdm
    lm_task.tqdm = lambda it, *a, **k: it
    try:
        raw = evaluate(lm, loaded, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    finally:
        lm_task.tqdm = bar
    return results_table(loaded, raw)


def format_table(tasks: dict[str, dict]) -> str:
    metrics = sorted({m for row in tasks.values() for m in row if m != "n"})
    head = ["task", *metrics, "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, row in tasks.items():
        cells = [task] + [f"{row[m]:.4f}" if m in row and math.isfinite(row[m]) else "" for m in metrics]
        lines.append("| " + " | ".join(cells + [str(row.get("n", ""))]) + " |")
    return "\n".join(lines)


def load_model(spec: str, tag: str | None, device=None):
    """(lm, tokenizer, run_dir or None, tag or None) for an export or a run directory."""
    from megaslm.analyze.scoring import load_scorer
    from megaslm.run_files import is_run_dir

    if tag is not None and not is_run_dir(spec):
        raise UserError(f"--tag {tag}: {spec} is not a megaslm run directory (--tag picks a run's checkpoint)")
    s = load_scorer(spec, device=device, tag=tag)
    if s.tokenizer is None:
        raise UserError(f"model {spec}: no tokenizer found (an export holds tokenizer files; a run names one in "
                        "data.tokenizer or its shards' meta.json)")
    used = None
    if is_run_dir(spec):
        from megaslm.export import verified_tag

        used = verified_tag(Path(spec) / "checkpoints", tag)
    return s.model.lm, s.tokenizer, s.run_dir, used


def make_lm(lm, tokenizer, batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True):
    from megaslm.eval.adapter import HFScorer, MegaslmLM

    return MegaslmLM(HFScorer(lm), tokenizer, max_length=int(lm.config.max_position_embeddings),
                     batch_tokens=batch_tokens, generator=lm, progress=progress)


def evaluate_model(spec: str, tasks: str | list[str], *, limit: int | None = None, num_fewshot: int | None = None,
                   out: str | None = None, tag: str | None = None, include_path: list[str] | None = None,
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, log_wandb: bool = True) -> dict:
    """Evaluate, write OUT/results.json (when out is given), log to the run's wandb; returns the results dict."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_tokens < 1:
        raise UserError(f"--batch-tokens must be >= 1, got {batch_tokens}")
    names = parse_tasks(tasks)
    t0 = time.time()
    loaded = load_tasks(names, include_path, num_fewshot)  # before the model: a bad task fails fast
    set_accelerator()  # not before: it imports torch
    lm, tokenizer, run_dir, used_tag = load_model(spec, tag)
    # a line as soon as the input is known good (a bad one gets its error line alone): building the requests
    # takes a while before the scoring's own progress lines start
    print(f"megaslm eval: {spec}: tasks {', '.join(names)} and the model loaded in {time.time() - t0:.0f} s; "
          "building the requests", file=sys.stderr, flush=True)
    table = run_tasks(make_lm(lm, tokenizer, batch_tokens), loaded, limit)
    result = {"tasks": table, "model": spec, "limit": limit, "num_fewshot": num_fewshot,
              "tag": used_tag, "seconds": round(time.time() - t0, 2)}
    if out is not None:
        from megaslm.atomic import write_json

        dest = Path(out)
        dest.mkdir(parents=True, exist_ok=True)
        write_json(dest / "results.json", result)
    if log_wandb and run_dir is not None:
        from megaslm.analyze.media import log_values

        step = int(used_tag.split("_")[1]) if used_tag else None
        log_values(run_dir, {**{f"eval/{t}/{m}": v for t, row in table.items() for m, v in row.items()},
                             **({"eval/checkpoint_step": step} if step is not None else {})})
    return result


def main(a) -> int:
    res = evaluate_model(a.model, a.tasks, limit=a.limit, num_fewshot=a.num_fewshot, out=a.out, tag=a.tag,
                         include_path=a.include_path, batch_tokens=a.batch_tokens)
    print(format_table(res["tasks"]))
    where = f"; results in {Path(a.out) / 'results.json'}" if a.out else ""
    print(f"megaslm eval: {a.model} ({res['tag'] or 'export'}), limit {a.limit}, {res['seconds']:.1f} s{where}",
          file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="lm-eval tasks (ARC, SciQ, GSM8K bpb, ...) on an export or a run, offline")
    ev.add_argument("model", help="a Hugging Face directory (megaslm export) or a megaslm run directory")
    ev.add_argument("--tasks", required=True, help="comma-separated task names (built-in: "
                    + ", ".join(__import__("megaslm.eval.tasks", fromlist=["BUILTIN"]).BUILTIN) + ")")
    ev.add_argument("--limit", type=int, default=None, help="score the first N examples of each task")
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    ev.add_argument("--out", default=None, help="directory for results.json")
    ev.add_argument("--tag", default=None, help="a run's checkpoint (step_XXXXXXXX; default: latest verified)")
    ev.add_argument("--include-path", action="append", default=None,
                    help="a directory or YAML file of your own lm-eval tasks (repeatable)")
    ev.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                    help="padded tokens per forward (default %(default)s)")
    ev.set_defaults(func=main, sets_accelerator=True)  # evaluate_model: once the tasks are found

