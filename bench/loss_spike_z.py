"""How far a run's step losses stray above their rolling window: to choose train.spike_skip_sigma.

    python bench/loss_spike_z.py RUN_DIR/metrics.jsonl [...]

For each window size, the z-score of every step's loss against the preceding window (SkipGuard's rule: judged
once the window is half full, sample standard deviation), its maximum and 99th percentile, and how many steps
k = 2, 3, 4, 6 would skip; then the step-to-step noise of the loss around its centred 11-step mean (steps 150
on), which compares objectives (SLM's selected-token loss against CLM's) at the same batch size. Needs
train.log_every=1.
"""

import json
import statistics
import sys


def zscores(losses: list[float], window: int) -> list[float]:
    out, win = [], []
    for x in losses:
        if len(win) >= max(2, window // 2):
            out.append((x - statistics.mean(win)) / statistics.stdev(win))
        win = (win + [x])[-window:]
    return out


def main(paths: list[str]) -> None:
    runs = {p: [r["loss"] for r in map(json.loads, open(p)) if r.get("loss") is not None] for p in paths}
    for path, losses in runs.items():
        for w in (32, 64, 128):
            zs = sorted(zscores(losses, w))
            if zs:
                skips = "/".join(str(sum(z > k for z in zs)) for k in (2, 3, 4, 6))
                print(f"{path}: window {w}: {len(zs)} steps judged, max z {zs[-1]:.2f}, "
                      f"p99 {zs[int(0.99 * (len(zs) - 1))]:.2f}, skipped at k=2/3/4/6: {skips}")
    for path, losses in runs.items():
        res = [losses[t] - statistics.mean(losses[t - 5:t + 6]) for t in range(150, len(losses) - 5)]
        if len(res) > 1:
            print(f"{path}: step-to-step noise (steps 150+): std {statistics.stdev(res):.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
