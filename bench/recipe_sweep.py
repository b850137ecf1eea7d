"""More SLM settings on a finished `megaslm recipe rho1-math` directory, reusing its reference, base evaluation and
CLM baseline: each variant is one more SLM run (the recipe's own SLM config with the changed keys) in
DIR/sweep/NAME/, evaluated in the loop as the recipe's SLM is. Prints, per variant and task, the final figure and
the step at which it reaches CLM's final (the recipe's report rule: linear between evaluations, the base at
step 0; the speed-up against the step at which CLM itself first reaches it); writes DIR/sweep/sweep.json. A finished variant is not run again.

    python bench/recipe_sweep.py DIR --ratio 0.4 0.8 [--variant soft=slm.weighting=soft,slm.temperature=0.5]
        [--ref-steps 120]

`--ref-steps N`: another reference, the recipe's reference run with N steps (DIR/sweep/reference_N/, exported to
DIR/sweep/reference_N/hf), then SLM at the recipe's settings with it (variant `ref_N`).

Only SLM-side keys belong in a variant (slm.*, reference.*): the CLM baseline is reused, so a change that CLM would
see too (the learning rate, the steps) would not be compared like for like.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from megaslm.phases import megaslm, read_metrics, train
from megaslm.recipe.rho1_math import TASKS_DIR
from megaslm.recipe.results import HIGHER_IS_BETTER, eval_series, speedup


def variants(a) -> dict[str, dict]:
    out = {f"ratio_{r:g}": {"slm": {"ratio": r}} for r in a.ratio}
    for v in a.variant:
        name, _, sets = v.partition("=")
        change: dict = {}
        for kv in sets.split(","):
            key, _, val = kv.partition("=")
            sec, _, field = key.partition(".")
            if sec not in ("slm", "reference") or not field or not val:
                raise SystemExit(f"error: --variant {v}: want NAME=slm.KEY=VALUE[,reference.KEY=VALUE] (SLM-side "
                                 "keys only)")
            change.setdefault(sec, {})[field] = yaml.safe_load(val)
        out[name] = change
    return out


def _nproc(root: Path) -> int:
    return int(json.loads((root / "recipe.json").read_text())["params"]["nproc"])


def train_reference(root: Path, steps: int) -> str:
    """The recipe's reference run with `steps` steps, in DIR/sweep/reference_STEPS; its exported HF directory."""
    out = root / "sweep" / f"reference_{steps}"
    if not (out / "hf" / "config.json").exists():
        cfg = yaml.safe_load((root / "reference.yaml").read_text())
        cfg["run"].update({"dir": str(out / "run"), "name": f"reference-{steps}"})
        cfg["train"]["steps"] = steps
        out.mkdir(parents=True, exist_ok=True)
        print(f"recipe_sweep: reference of {steps} steps", flush=True)
        train(cfg, out / "reference.yaml", _nproc(root))
        megaslm("export", str(out / "run"), "--out", str(out / "hf"))
    return str(out / "hf")


def run_variant(root: Path, name: str, change: dict) -> Path:
    cfg = yaml.safe_load((root / "slm.yaml").read_text())
    for sec, kv in change.items():
        cfg[sec].update(kv)
    if "eval" in cfg:  # this checkout's task files (the recipe may have run from another checkout)
        cfg["eval"]["include_path"] = [TASKS_DIR]
    run = root / "sweep" / name
    cfg["run"].update({"dir": str(run / "run"), "name": f"slm-{name}"})
    if not (run / "done.json").exists():
        run.mkdir(parents=True, exist_ok=True)
        print(f"recipe_sweep: {name}: {change}", flush=True)
        train(cfg, run / "slm.yaml", _nproc(root))
        (run / "done.json").write_text(json.dumps(change) + "\n")
    return run / "run"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a finished recipe directory (its recipe.json says complete)")
    p.add_argument("--ratio", type=float, nargs="*", default=[])
    p.add_argument("--variant", nargs="*", default=[], help="NAME=slm.KEY=VALUE[,reference.KEY=VALUE]")
    p.add_argument("--ref-steps", type=int, nargs="*", default=[], help="SLM with a reference trained N steps")
    a = p.parse_args()
    root = Path(a.dir).resolve()
    if not json.loads((root / "recipe.json").read_text()).get("complete"):
        print(f"error: {root}: the recipe has not finished (recipe.json)", file=sys.stderr)
        return 2
    base = json.loads((root / "eval" / "base" / "results.json").read_text())["tasks"]
    curves = {"clm": eval_series(read_metrics(root / "runs" / "clm")),
              "slm (recipe)": eval_series(read_metrics(root / "runs" / "slm"))}
    todo = variants(a)
    for n in a.ref_steps:
        todo[f"ref_{n}"] = {"reference": {"path": train_reference(root, n)}}
    for name, change in todo.items():
        curves[name] = eval_series(read_metrics(run_variant(root, name, change)))
    table: dict = {}
    for task, metrics in curves["clm"].items():
        for metric, clm in metrics.items():
            higher, b = metric in HIGHER_IS_BETTER, base.get(task, {}).get(metric)
            target = clm[-1][1]
            for name, c in curves.items():
                s = c.get(task, {}).get(metric, [])
                reach, _, ratio = speedup(clm, s, b, higher)  # the report's rule
                table.setdefault(f"{task}/{metric}", {})[name] = {
                    "curve": s, "final": s[-1][1] if s else None,
                    "vs_clm_final": s[-1][1] - target if s else None,
                    "steps_to_clm_final": None if reach is None else round(reach, 1),
                    "speedup": None if ratio is None else round(ratio, 2)}
    (root / "sweep").mkdir(exist_ok=True)
    (root / "sweep" / "sweep.json").write_text(json.dumps({"base": base, "table": table}, indent=1) + "\n")
    for key, rows in table.items():
        print(f"\n{key} (base {base.get(key.split('/')[0], {}).get(key.split('/')[1])})")
        print(f"{'variant':<14} {'final':>8} {'vs CLM':>8} {'reach CLM final':>16} {'speedup':>8}   curve")
        for name, r in rows.items():
            curve = " ".join(f"{v:.4f}" for _, v in r["curve"])
            fin = "-" if r["final"] is None else f"{r['final']:.4f}"
            vs = "-" if r["vs_clm_final"] is None else f"{r['vs_clm_final']:+.4f}"
            print(f"{name:<14} {fin:>8} {vs:>8} {r['steps_to_clm_final']!s:>16} {r['speedup']!s:>8}   {curve}")
        print("(reach: the first step at which the curve, linear between evaluations and from the base at step 0, "
              "is at CLM's final; it may leave it again: read `vs CLM`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
