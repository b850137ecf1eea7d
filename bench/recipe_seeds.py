"""Several finished `megaslm recipe rho1-math` runs (other seeds, same settings) side by side: per task and
metric, each run's CLM and SLM finals, SLM's step to CLM's final and the speed-up (the report's rule), their mean;
one PNG per metric with every run's curves (CLM solid, SLM dashed, one colour per run). Reads each DIR/report.json.

    python bench/recipe_seeds.py recipe_seed0 recipe_seed1 recipe_seed2 [--out seeds]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="finished recipe directories (their report.json)")
    p.add_argument("--out", default="recipe_seeds", help="directory for seeds.json and the PNGs")
    a = p.parse_args()
    reps = {}
    for d in a.dirs:
        f = Path(d) / "report.json"
        if not f.is_file():
            print(f"error: {f}: no report (has the recipe finished?)", file=sys.stderr)
            return 2
        r = json.loads(f.read_text())
        reps[f"{Path(d).name} (seed {r.get('seed')})"] = r
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    first = next(iter(reps.values()))
    for task, metrics in first["tasks"].items():
        for metric in metrics:
            rows = {name: r["tasks"].get(task, {}).get(metric) for name, r in reps.items()}
            rows = {k: v for k, v in rows.items() if v}
            print(f"\n{task} {metric} ({'higher' if first['tasks'][task][metric]['higher_is_better'] else 'lower'} "
                  "is better)")
            print(f"{'run':<28} {'base':>7} {'CLM':>7} {'SLM':>7} {'SLM-CLM':>8} {'SLM reach':>10} {'speed-up':>9}")
            for name, row in rows.items():
                print(f"{name:<28} {row['base'] or 0:>7.4f} {row['clm_final']:>7.4f} {row['slm_final']:>7.4f} "
                      f"{row['slm_final'] - row['clm_final']:>+8.4f} {row['slm_steps_to_clm_final']!s:>10} "
                      f"{row['speedup']!s:>9}")
            sp = [r["speedup"] for r in rows.values()]
            diff = [r["slm_final"] - r["clm_final"] for r in rows.values()]
            mean_sp = sum(sp) / len(sp) if sp and None not in sp else None
            print(f"{'mean':<28} {'':>7} {'':>7} {'':>7} {sum(diff) / len(diff):>+8.4f} {'':>10} "
                  f"{'-' if mean_sp is None else f'{mean_sp:.2f}':>9}")
            summary[f"{task}/{metric}"] = {"runs": {k: {key: v[key] for key in ("base", "clm_final", "slm_final",
                                                                               "slm_steps_to_clm_final", "speedup")}
                                                    for k, v in rows.items()},
                                           "mean_slm_minus_clm": sum(diff) / len(diff), "mean_speedup": mean_sp}
            _plot(task, metric, rows, out / f"seeds_{task}_{metric}.png")
    (out / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out / 'seeds.json'} and {len(summary)} PNGs in {out}")
    return 0


def _plot(task: str, metric: str, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (name, row) in enumerate(rows.items()):
        for run, ls in (("clm", "-"), ("slm", "--")):
            pts = ([[0, row["base"]]] if row["base"] is not None else []) + row[run]
            ax.plot([s for s, _ in pts], [v for _, v in pts], ls, marker="o", ms=3, color=f"C{k}",
                    label=f"{run.upper()} {name}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{task} {metric}: CLM (solid) and SLM (dashed), per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
