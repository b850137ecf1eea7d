"""The quick demo on several seeds: does SLM end below CLM on held-out clean text on each? (a check, no asserts)

    python bench/demo_seeds.py --out /tmp/demo_seeds --seeds 0 1 2 [--full]

Runs `megaslm demo [--quick] --seed S --out OUT/seed_S` for each seed (a finished seed is reused: the demo leaves
a finished directory as it is) and prints one row per seed from its report.json: final held-out loss of the CLM
baseline, the SLM run and the reference, SLM - CLM, and the demo's wall time.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--full", action="store_true", help="the full demo instead of --quick")
    a = ap.parse_args()
    rows = []
    for seed in a.seeds:
        out = Path(a.out) / f"seed_{seed}"
        cmd = [sys.executable, "-m", "megaslm.cli", "demo", "--seed", str(seed), "--out", str(out)]
        if subprocess.run(cmd + ([] if a.full else ["--quick"])).returncode != 0:
            print(f"seed {seed}: the demo failed (its error is above)")
            return 1
        r = json.loads((out / "report.json").read_text())
        f = r["final"]
        rows.append(f"| {seed} | {f['baseline_clm']:.4f} | {f['slm']:.4f} | {f['slm'] - f['baseline_clm']:+.4f} | "
                    f"{f['reference']:.4f} | {r['elapsed_s']:.0f} |")
    print("| seed | CLM held-out | SLM held-out | SLM - CLM | reference | wall s |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
