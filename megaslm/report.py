"""`megaslm report RUN_DIR [RUN_DIR ...] --out DIR`: plots and a markdown summary from runs' metrics.jsonl.

Writes into DIR (each plot only when some run logged its figures):
- `train_loss.png`: the objective `loss` (solid) and `loss_all` (dashed) over steps, every run;
- `slm_losses.png`: `loss_selected`, `loss_unselected` and `ref_loss` of the SLM runs;
- `val_loss.png`: `val_loss` of all runs overlaid (e.g. CLM vs SLM);
- `selected_frac.png`: `selected_frac`, and per source `selected_frac/<i>` (named by the training shards' sources);
- `excess.png`: excess-loss quantiles p10/p50/p90 (band and median) and the selection threshold;
- `throughput.png`: `tokens_per_s` and, where logged (GPUs), `mfu`;
- `eval.png`: the in-loop evaluator's `eval/<task>/<metric>` over steps, one panel per task, runs side by side;
- `report.md`: a table per run (final and best figures, selected fraction per source, throughput) and the plots;
- `report.json`: the same figures.
With wandb on, every plot is logged to each run's wandb run (megaslm/analyze/media.py).
Per-source selected fractions over a run are token-weighted: sum(selected_frac/i * tokens/i) / sum(tokens/i).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from megaslm import run_files
from megaslm.analyze.media import log_media
from megaslm.atomic import write_bytes, write_json, write_text


def read_run(run_dir: str) -> dict:
    run = Path(run_dir)
    recs = run_files.metrics(run)
    cfg = run_files.saved_config(run) or {}
    return {"dir": run, "name": run.name, "records": recs, "config": cfg, "sources": _sources(cfg)}


def _sources(cfg: dict) -> list[str]:
    meta = Path(str((cfg.get("data") or {}).get("train") or "")) / "meta.json"
    return [Path(s).name for s in json.loads(meta.read_text())["sources"]] if meta.is_file() else []


def series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and "step" in r]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def _source_keys(run: dict) -> list[tuple[str, str, str]]:
    """(label, selected_frac key, tokens key) per tracked source."""
    idx = sorted({int(k.split("/")[1]) for r in run["records"] for k in r if k.startswith("selected_frac/")})
    names = run["sources"]
    return [(names[i] if i < len(names) else f"source {i}", f"selected_frac/{i}", f"tokens/{i}") for i in idx]


def source_selected(run: dict) -> dict[str, float]:
    out = {}
    for label, fkey, tkey in _source_keys(run):
        num = den = 0.0
        for r in run["records"]:
            if r.get(fkey) is not None:
                w = r.get(tkey) or 1.0
                num, den = num + r[fkey] * w, den + w
        if den:
            out[label] = num / den
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def run_summary(run: dict) -> dict:
    recs = run["records"]
    val = series(recs, "val_loss")[1]
    last = recs[-1] if recs else {}
    return {"objective": (run["config"] or {}).get("objective", "clm"), "steps": last.get("step", 0),
            "final_loss": last.get("loss"), "final_val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None,
            "tokens_per_s": _mean(series(recs, "tokens_per_s")[1]), "step_time": _mean(series(recs, "step_time")[1]),
            "mfu": _mean(series(recs, "mfu")[1]) if series(recs, "mfu")[1] else None,
            "selected_frac": _mean(series(recs, "selected_frac")[1]) if series(recs, "selected_frac")[1] else None,
            "per_source_selected": source_selected(run),
            "eval": {k[5:]: v for r in recs for k, v in r.items()
                     if k.startswith("eval/") and k != "eval/seconds" and v is not None}}  # the last of each


# ---------------------------------------------------------------------------------------------- plots
def _figure(ncols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.3), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, axes, path: Path) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _lines(ax, runs, key, style="-", label="{run}", marker=None) -> bool:
    drawn = False
    for run in runs:
        xs, ys = series(run["records"], key)
        if xs:
            ax.plot(xs, ys, style, color=run["color"], marker=marker, ms=3, label=label.format(run=run["name"], key=key))
            drawn = True
    return drawn


def plot_train_loss(runs, path) -> bool:
    plt, fig, (ax,) = _figure()
    drawn = _lines(ax, runs, "loss", "-", "{run}: loss")
    _lines(ax, [r for r in runs if run_summary(r)["objective"] == "slm"], "loss_all", "--", "{run}: loss_all")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("training loss (solid: the objective; dashed: all tokens)")
    _save(plt, fig, [ax], path)
    return drawn


def plot_slm_losses(runs, path) -> bool:
    slm = [r for r in runs if series(r["records"], "loss_selected")[0]]
    if not slm:
        return False
    plt, fig, (ax,) = _figure()
    for run in slm:
        for key, style in (("loss_selected", "-"), ("loss_unselected", "--"), ("ref_loss", ":")):
            xs, ys = series(run["records"], key)
            ax.plot(xs, ys, style, color=run["color"], label=f"{run['name']}: {key}")
    ax.set_ylabel("nats/token")
    ax.set_title("SLM: loss on selected / unselected tokens, reference loss")
    _save(plt, fig, [ax], path)
    return True


def plot_val_loss(runs, path) -> bool:
    plt, fig, (ax,) = _figure()
    drawn = _lines(ax, runs, "val_loss", "-", "{run}", marker="o")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("validation loss")
    _save(plt, fig, [ax], path)
    return drawn


def plot_selected(runs, path) -> bool:
    slm = [r for r in runs if series(r["records"], "selected_frac")[0]]
    if not slm:
        return False
    plt, fig, (ax,) = _figure()
    for i, run in enumerate(slm):
        xs, ys = series(run["records"], "selected_frac")
        ax.plot(xs, ys, "-", color="k" if len(slm) == 1 else run["color"], lw=2, label=f"{run['name']}: all")
        for j, (label, fkey, _) in enumerate(_source_keys(run)):
            xs, ys = series(run["records"], fkey)
            ax.plot(xs, ys, "--", color=f"C{(i + j + 1) % 10}", label=f"{run['name']}: {label}")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of tokens selected")
    ax.set_title("selected fraction, overall and per source")
    _save(plt, fig, [ax], path)
    return True


def plot_excess(runs, path) -> bool:
    slm = [r for r in runs if series(r["records"], "excess_p50")[0]]
    if not slm:
        return False
    plt, fig, (ax,) = _figure()
    for run in slm:
        xs, lo = series(run["records"], "excess_p10")
        _, hi = series(run["records"], "excess_p90")
        if len(lo) == len(hi) == len(xs):
            ax.fill_between(xs, lo, hi, color=run["color"], alpha=0.15, label=f"{run['name']}: p10-p90")
        ax.plot(*series(run["records"], "excess_p50"), "-", color=run["color"], label=f"{run['name']}: median")
        ax.plot(*series(run["records"], "threshold"), "--", color=run["color"], label=f"{run['name']}: threshold")
    ax.set_ylabel("excess loss = loss - reference loss (nats)")
    ax.set_title("excess-loss quantiles and the selection threshold")
    _save(plt, fig, [ax], path)
    return True


def plot_throughput(runs, path) -> bool:
    has_mfu = any(series(r["records"], "mfu")[0] for r in runs)
    plt, fig, axes = _figure(2 if has_mfu else 1)
    drawn = _lines(axes[0], runs, "tokens_per_s")
    axes[0].set_ylabel("tokens/s (all ranks)")
    axes[0].set_title("throughput")
    if has_mfu:
        _lines(axes[1], runs, "mfu")
        axes[1].set_ylabel("MFU")
        axes[1].set_title("model FLOPs utilization")
    _save(plt, fig, axes, path)
    return drawn


def eval_keys(runs) -> dict[str, list[str]]:
    """{task: [metric, ...]} of the in-loop evaluator's `eval/<task>/<metric>` figures, in first-seen order."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for rec in run["records"]:
            for k in rec:
                parts = k.split("/")
                if len(parts) == 3 and parts[0] == "eval" and parts[2] not in out.setdefault(parts[1], []):
                    out[parts[1]].append(parts[2])
    return out


def plot_eval(runs, path) -> bool:
    """One panel per task, every run's metrics over steps (solid: the first metric, dashed: the next)."""
    keys = eval_keys(runs)
    if not keys:
        return False
    plt, fig, axes = _figure(len(keys))
    for ax, (task, metrics) in zip(axes, keys.items()):
        for m, style in zip(metrics, ("-", "--", ":", "-.")):
            _lines(ax, runs, f"eval/{task}/{m}", style, f"{{run}}: {m}", marker="o")
        ax.set_title(task)
        ax.set_ylabel("bits per byte (lower is better)" if metrics == ["bpb"] else "score")
    _save(plt, fig, axes, path)
    return True


PLOTS = (("train_loss.png", "Training loss", plot_train_loss),
         ("slm_losses.png", "Selected, unselected and reference loss", plot_slm_losses),
         ("val_loss.png", "Validation loss", plot_val_loss),
         ("selected_frac.png", "Selected fraction", plot_selected),
         ("excess.png", "Excess loss and threshold", plot_excess),
         ("throughput.png", "Throughput", plot_throughput),
         ("eval.png", "Downstream evaluation (eval/<task>/<metric>)", plot_eval))


# ---------------------------------------------------------------------------------------------- markdown
def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _markdown(title: str, preface: list[str], runs: list[dict], summaries: dict, plots: list[tuple[str, str]]):
    lines = [f"# {title}", "", *preface, "## Runs", "",
             "| run | objective | steps | final loss | final val_loss | best val_loss | selected frac | tokens/s | "
             "s/step | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        s = summaries[run["name"]]
        lines.append(f"| {run['name']} | {s['objective']} | {s['steps']} | {_fmt(s['final_loss'])} | "
                     f"{_fmt(s['final_val_loss'])} | {_fmt(s['best_val_loss'])} | {_fmt(s['selected_frac'], 3)} | "
                     f"{_fmt(s['tokens_per_s'], 0)} | {_fmt(s['step_time'], 3)} | {_fmt(s['mfu'], 3)} |")
    per_source = [(run["name"], src, f) for run in runs for src, f in summaries[run["name"]]["per_source_selected"].items()]
    if per_source:
        lines += ["", "## Selected fraction per source (token-weighted over the run)", "",
                  "| run | source | selected fraction |", "|---|---|---|"]
        lines += [f"| {r} | {src} | {f:.3f} |" for r, src, f in per_source]
    evals = sorted({k for run in runs for k in summaries[run["name"]]["eval"]})
    if evals:
        lines += ["", "## Downstream tasks at the last evaluation (eval/<task>/<metric>)", "",
                  "| run | " + " | ".join(evals) + " |", "|---|" + "---|" * len(evals)]
        lines += [f"| {run['name']} | " + " | ".join(_fmt(summaries[run["name"]]["eval"].get(k)) for k in evals)
                  + " |" for run in runs]
    for name, heading in plots:
        lines += ["", f"## {heading}", "", f"![{heading}]({name})"]
    return "\n".join(lines) + "\n"


def build_report(run_dirs: list[str], out: str, title: str = "megaslm report",
                 preface: list[str] | None = None) -> dict:
    """Write the plots, report.md and report.json into `out`; returns {"path", "runs", "plots"}."""
    runs = [read_run(d) for d in run_dirs]
    for i, r in enumerate(runs):
        r["color"] = f"C{i % 10}"  # one colour per run in every plot
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        for r in runs:  # two runs called "slm" in different places: tell them apart by their parent
            r["name"] = f"{r['dir'].parent.name}/{r['name']}"
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    plots = [(name, heading) for name, heading, fn in PLOTS if fn(runs, dest / name)]
    for name, _, _ in PLOTS:  # a plot with nothing drawn is not kept
        if name not in dict(plots) and (dest / name).exists():
            (dest / name).unlink()
    summaries = {r["name"]: run_summary(r) for r in runs}
    write_text(dest / "report.md", _markdown(title, preface or [], runs, summaries, plots))
    write_json(dest / "report.json", {"runs": summaries, "plots": [p for p, _ in plots]})
    for run in runs:
        log_media(run["dir"], {f"report/{Path(p).stem}": dest / p for p, _ in plots})
    return {"path": dest / "report.md", "runs": summaries, "plots": [p for p, _ in plots]}
