"""The rho1-math recipe's results: report.json, report.md and one PNG per task metric.

report.json:
    {"recipe", "settings", "tokens_per_step", "elapsed_s", "phase_seconds": {phase: s},
     "tasks": {task: {metric: {"base": v, "clm": [[step, v], ...], "slm": [[step, v], ...],
                               "clm_final": v, "slm_final": v, "higher_is_better": bool,
                               "slm_steps_to_clm_final": s or null, "clm_steps_to_clm_final": c or null,
                               "speedup": c / s or null}}},
     "contamination": the check's result (megaslm/contamination.py), "selection": per-source selected fraction}

`slm_steps_to_clm_final`: the step at which SLM's curve first reaches CLM's final figure, linear between the
evaluated steps with the base at step 0 (null: it never does, or CLM's final is no better than the base:
`clm_improved_on_base` false); `clm_steps_to_clm_final`: the same for CLM's own curve (its last step when it
improves steadily; earlier when it reached that figure before and went back); `speedup`: the second over the first,
so that a CLM curve that reached its final figure early and went back does not count as SLM's speed-up.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from megaslm.atomic import write_bytes, write_json, write_text
from megaslm.phases import read_metrics

HIGHER_IS_BETTER = {"acc", "acc_norm", "exact_match"}


def eval_series(records: list[dict]) -> dict[str, dict[str, list[list[float]]]]:
    """{task: {metric: [[step, value], ...]}} from a run's `eval/<task>/<metric>` records."""
    out: dict = {}
    for r in records:
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "eval" and isinstance(v, (int, float)):
                out.setdefault(parts[1], {}).setdefault(parts[2], []).append([r["step"], float(v)])
    return out


def steps_to_reach(curve: list[list[float]], base: float | None, target: float, higher: bool) -> float | None:
    """First step at which `curve` (with `base` at step 0) reaches `target`, linear between points."""
    pts = ([[0, base]] if base is not None else []) + sorted(curve)

    def ok(v):
        return v >= target if higher else v <= target

    for (s0, v0), (s1, v1) in zip([[None, None]] + pts[:-1], pts):
        if ok(v1):
            if s0 is None or v1 == v0:
                return float(s1)
            return float(s0 + (s1 - s0) * (target - v0) / (v1 - v0))
    return None


def improved_on_base(clm: list[list[float]], base: float | None, higher: bool) -> bool:
    """CLM's final is better than the base (or there is no base figure); else the base "reaches" it at step 0."""
    return bool(clm) and (base is None or (clm[-1][1] > base if higher else clm[-1][1] < base))


def speedup(clm: list[list[float]], slm: list[list[float]], base: float | None,
            higher: bool) -> tuple[float | None, float | None, float | None]:
    """(SLM's steps to CLM's final, CLM's own steps to it, their ratio) by `steps_to_reach`; all None when either
    curve is empty or CLM's final is no better than the base (the base "reaches" it at step 0: nothing to measure).
    CLM's own step is its first reach of its final, not its last step, so that a CLM curve that dipped below its
    final and came back does not count as a speed-up for SLM."""
    if not slm or not improved_on_base(clm, base, higher):
        return None, None, None
    target = clm[-1][1]
    s, c = steps_to_reach(slm, base, target, higher), steps_to_reach(clm, base, target, higher)
    return s, c, (c / s if s else None)


def task_table(root: Path) -> dict:
    base = json.loads((root / "eval" / "base" / "results.json").read_text())["tasks"]
    runs = {name: eval_series(read_metrics(root / "runs" / name)) for name in ("clm", "slm")}
    out: dict = {}
    for task, metrics in runs["clm"].items():
        for metric, clm in metrics.items():
            slm = runs["slm"].get(task, {}).get(metric, [])
            b = base.get(task, {}).get(metric)
            higher = metric in HIGHER_IS_BETTER
            row = {"base": b, "clm": clm, "slm": slm, "higher_is_better": higher,
                   "clm_final": clm[-1][1] if clm else None, "slm_final": slm[-1][1] if slm else None}
            reach, own, ratio = speedup(clm, slm, b, higher)
            row["clm_improved_on_base"] = improved_on_base(clm, b, higher)
            row["slm_steps_to_clm_final"] = None if reach is None else round(reach, 1)
            row["clm_steps_to_clm_final"] = None if own is None else round(own, 1)
            row["speedup"] = None if ratio is None else round(ratio, 2)
            out.setdefault(task, {})[metric] = row
    return out


def plot_metric(task: str, metric: str, row: dict, tokens_per_step: int, path: Path) -> None:
    """Two panels, against optimizer steps and against training tokens: CLM and SLM, the base as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, scale, xlabel in zip(axes[0], (1, tokens_per_step), ("optimizer step", "training tokens")):
        for name, color in (("clm", "C0"), ("slm", "C1")):
            pts = ([[0, row["base"]]] if row["base"] is not None else []) + row[name]  # both start at the base
            if pts:
                ax.plot([s * scale for s, _ in pts], [v for _, v in pts], "-o", ms=4, color=color,
                        label=name.upper())
        if row["base"] is not None:
            ax.axhline(row["base"], color="grey", ls="--", label="base")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if row['higher_is_better'] else 'lower'} is better)")
        ax.set_title(f"{task} {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def markdown(p: dict, tasks: dict, cont: dict | None, state: dict, elapsed: float, plots: list[str],
             selection: dict) -> str:
    lines = ["# Rho-1 continual pretraining (megaslm recipe rho1-math)", "",
             f"Base {state.get('base_dir')}; reference: {p['ref_steps']} CLM steps on clean math; CLM and SLM "
             f"(ratio {p['ratio']}, global): {p['steps']} steps of {p['seq_len']} x {p['micro_batch']} x "
             f"{p['nproc']} tokens on the noisy mix ({p['noise_share']:.0%} noise), lr {p['lr']}, seed "
             f"{state.get('seed')}. In-loop evaluation every {p['eval_every']} steps on the first {p['eval_limit']} "
             f"examples of each task. Wall time {elapsed:.0f} s.", "", "## Figures per evaluated step", ""]
    for task, metrics in tasks.items():
        for metric, row in metrics.items():
            lines += [f"### {task} {metric} ({'higher' if row['higher_is_better'] else 'lower'} is better)", "",
                      "| step | base | CLM | SLM |", "|---|---|---|---|"]
            slm = dict((s, v) for s, v in row["slm"])
            lines += [f"| {int(s)} | {_fmt(row['base'])} | {_fmt(v)} | {_fmt(slm.get(s))} |" for s, v in row["clm"]]
            reach = row["slm_steps_to_clm_final"]
            if not row["clm_improved_on_base"]:
                verdict = f"CLM's final ({_fmt(row['clm_final'])}) is no better than the base: no speed-up to measure"
            elif reach is None:
                verdict = f"SLM does not reach CLM's final ({_fmt(row['clm_final'])}) within the run"
            else:
                verdict = (f"SLM reaches CLM's final ({_fmt(row['clm_final'])}) at step {reach}, CLM at step "
                           f"{row['clm_steps_to_clm_final']} ({row['speedup']}x fewer steps; linear between "
                           "evaluations, the base at step 0)")
            if row["slm_final"] is not None and row["clm_final"] is not None and row["slm_final"] != row["clm_final"]:
                better = (row["slm_final"] > row["clm_final"]) == row["higher_is_better"]
                verdict += (f". SLM ends {'better' if better else 'worse'} than CLM: {_fmt(row['slm_final'])} against "
                            f"{_fmt(row['clm_final'])}")
            lines += ["", verdict + ".", "",
                      f"![{task} {metric}](eval_{task}_{metric}.png)", ""]
    if cont:
        from megaslm.contamination import summary

        lines += ["## Contamination check", "", summary(cont) + ".", "", "Details: contamination.json.", ""]
    if selection:
        lines += ["## What SLM selected", "", "| source | selected fraction |", "|---|---|"]
        lines += [f"| {s} | {f:.3f} |" for s, f in selection.items()]
        lines += ["", "Token view (excess loss per token, final SLM model vs the reference): "
                  "[tokens/tokens.html](tokens/tokens.html).", ""]
    view = state.get("token_view") or {}
    if view.get("sources"):
        lines += ["| token view sample: source | tokens | selected fraction | mean loss | mean ref loss |",
                  "|---|---|---|---|---|"]
        lines += [f"| {n} | {v['tokens']} | {v['selected_frac']:.3f} | {v['mean_loss']:.4f} | "
                  f"{v['mean_ref_loss']:.4f} |" for n, v in view["sources"].items()]
        lines.append("")
    secs = state.get("phase_seconds") or {}
    if secs:
        lines += ["## Wall time per phase", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in secs.items()]
    return "\n".join(lines) + "\n"


def write_report(root: Path, p: dict, state: dict, tokens_per_step: int, elapsed: float) -> Path:
    from megaslm.report import read_run, source_selected

    tasks = task_table(root)
    plots = []
    for task, metrics in tasks.items():
        for metric, row in metrics.items():
            name = f"eval_{task}_{metric}.png"
            plot_metric(task, metric, row, tokens_per_step, root / name)
            plots.append(name)
    cont_file = root / "contamination.json"
    cont = json.loads(cont_file.read_text()) if cont_file.is_file() else None
    selection = source_selected(read_run(str(root / "runs" / "slm")))
    view_file = root / "tokens" / "summary.json"
    if view_file.is_file():
        state = {**state, "token_view": json.loads(view_file.read_text())}
    write_json(root / "report.json", {"recipe": "rho1-math", "settings": p, "seed": state.get("seed"),
                                      "tokens_per_step": tokens_per_step, "elapsed_s": round(elapsed, 1),
                                      "phase_seconds": state.get("phase_seconds", {}), "tasks": tasks,
                                      "contamination": cont, "selection": selection, "plots": plots})
    write_text(root / "report.md", markdown(p, tasks, cont, state, elapsed, plots, selection))
    return root / "report.md"
