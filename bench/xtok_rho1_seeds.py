"""One picture of several `bench/xtok_rho1.py` runs (seeds or variants sharing one OUT): each run's CLM and SLM
held-out curves, and a table of the final losses.

    python bench/xtok_rho1_seeds.py OUT [TAG ...] --png docs/xtok_rho1_transplant.png   # TAG "" is the untagged run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("tags", nargs="*", default=[""])
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="Rho-1 with a reference of another tokenizer, per seed")
    a = p.parse_args()
    runs = {t: json.loads((Path(a.out) / f"xtok_rho1{t}.json").read_text()) for t in a.tags}
    print(f"{'run':>8} {'seed':>5} {'CLM final':>10} {'SLM final':>10} {'SLM - CLM':>10} {'kept clean/noise':>17}")
    for t, r in runs.items():
        c, s = (r["val_loss"][k][max(r["val_loss"][k], key=int)] for k in ("clm", "slm"))
        kept = f"{r['selected_frac_clean']:.3f}/{r['selected_frac_noise']:.3f}"
        print(f"{t or '-':>8} {r['seed']:>5} {c:>10.4f} {s:>10.4f} {s - c:>+10.4f} {kept:>17}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (t, r) in enumerate(runs.items()):
        for k, style in (("clm", "-"), ("slm", "--")):
            curve = {int(s): v for s, v in r["val_loss"][k].items()}
            ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], style, marker="o", ms=3, color=f"C{i}",
                    label=f"{k.upper()}, seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss on clean text (nats/token)")
    ax.set_title(a.title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.png, dpi=110)
    print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
