"""`megaslm analyze dynamics RUN_DIR`: how token losses move during training (Rho-1's Figure 2 view).

One fixed held-out sample (the first `--tokens` tokens of `--data`, cut into windows of the run's
`train.seq_len`) is scored by every checkpoint the run kept (train it with `train.keep_checkpoints: 0` and a
`train.save_every` to keep them all). Each token is put in a category by its loss at the first and at the last
checkpoint: H->H, L->H, H->L, L->L, where H means loss > threshold. The default threshold is the mean token loss
of the sample at the last checkpoint: it does not depend on the vocabulary size or on how long the run trained,
and it splits tokens into those the final model finds harder than its average token and the others (a fixed
value in nats means different things for a 1k and a 128k vocabulary). The categories partition the sample.

Outputs in DIR:
- `dynamics.csv`: `step`, `category`, `n_tokens`, `mean_loss` (mean loss of the category's tokens at that
  checkpoint), one row per checkpoint and category.
- `dynamics.png`: mean loss of each category over the steps; with `--reference`, a second panel with the fraction
  of each category that the selection (the run's `slm.ratio`, scope global over the sample) keeps at the last
  checkpoint, also written to `selection.csv` (`category`, `n_tokens`, `n_selected`, `selected_frac`).
- `token_losses.npz`: `steps` [C], `token_ids` [N], `losses` [C, N] (float32): every token's trajectory.
"""

from __future__ import annotations

import csv
import json
import io
import time
from pathlib import Path

import numpy as np
import torch

from megaslm import run_files
from megaslm.analyze.documents import token_stream
from megaslm.analyze.media import log_media
from megaslm.analyze.scoring import load_scorer, pick_device, release, run_tokenizer, score_windows
from megaslm.atomic import write_bytes, write_json, write_text
from megaslm.errors import UserError
from megaslm.loss import select_tokens
from megaslm.train.checkpoint import latest_tag, list_tags

CATEGORIES = ("H->H", "L->H", "H->L", "L->L")


def kept_checkpoints(run_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first (a tag newer than latest_complete is an unfinished save)."""
    root = run_dir / "checkpoints"
    last = latest_tag(root)
    if last is None:
        raise UserError(f"{run_dir}: no complete checkpoint (is it a megaslm run directory?)")
    tags = [t for t in list_tags(root) if t <= last]
    if len(tags) < 2:
        raise UserError(f"{run_dir} kept only checkpoint {last}; dynamics needs at least two: train with "
                        "train.keep_checkpoints: 0 (keep all) and train.save_every: N")
    return tags


def categorize(first: np.ndarray, last: np.ndarray, threshold: float) -> np.ndarray:
    """Index into CATEGORIES of every token."""
    hf, hl = first > threshold, last > threshold
    return np.where(hf, np.where(hl, 0, 2), np.where(hl, 1, 3))


def category_rows(steps: list[int], losses: np.ndarray, cats: np.ndarray) -> list[dict]:
    rows = []
    for c, step in enumerate(steps):
        for k, name in enumerate(CATEGORIES):
            m = cats == k
            rows.append({"step": step, "category": name, "n_tokens": int(m.sum()),
                         "mean_loss": float(losses[c, m].mean()) if m.any() else float("nan")})
    return rows


def _sample_windows(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    return [stream[s:s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]


def _selection(reference: str, windows, losses_last: np.ndarray, cats: np.ndarray, ratio: float, batch_size: int,
               eos: int, vocab_size: int) -> list[dict]:
    ref = load_scorer(reference, pick_device())
    if ref.vocab_size != vocab_size:
        raise UserError(f"--reference {reference} has vocab_size {ref.vocab_size} but the run's model has "
                        f"{vocab_size}: the reference must share the tokenizer")
    ref_loss = np.concatenate(score_windows(ref, windows, batch_size, eos, "reference"))
    excess = torch.from_numpy(losses_last - ref_loss).view(1, -1)
    sel = select_tokens(excess, torch.ones_like(excess, dtype=torch.bool), ratio, scope="global").view(-1).numpy()
    return [{"category": name, "n_tokens": int((cats == k).sum()), "n_selected": int(sel[cats == k].sum()),
             "selected_frac": float(sel[cats == k].mean()) if (cats == k).any() else float("nan")}
            for k, name in enumerate(CATEGORIES)]


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot(rows: list[dict], selection: list[dict] | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"H->H": "#d62728", "L->H": "#ff7f0e", "H->L": "#2ca02c", "L->L": "#1f77b4"}
    fig, axes = plt.subplots(1, 2 if selection else 1, figsize=(12 if selection else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for name in CATEGORIES:
        pts = [(r["step"], r["mean_loss"]) for r in rows if r["category"] == name and r["n_tokens"]]
        if pts:
            n = next(r["n_tokens"] for r in rows if r["category"] == name)
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, color=colors[name], label=f"{name} ({n} tokens)")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("mean token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if selection:
        bx = axes[0][1]
        bars = bx.bar([s["category"] for s in selection], [s["selected_frac"] for s in selection],
                      color=[colors[s["category"]] for s in selection])
        bx.bar_label(bars, labels=[f"{s['n_selected']}/{s['n_tokens']}" for s in selection])
        bx.set_ylim(0, 1)
        bx.set_ylabel("fraction selected at the last checkpoint")
        bx.set_title("what the reference makes SLM keep")
        bx.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def _score_checkpoints(run: Path, tags: list[str], windows, eos: int, batch_size: int) -> np.ndarray:
    from megaslm.monitor import Progress

    out, progress = [], Progress(len(tags), window=3)
    for i, tag in enumerate(tags):
        when = f" | {progress.text(i)}" if i else ""  # the ETA needs one checkpoint's pace
        print(f"megaslm: scoring checkpoint {tag} ({i + 1}/{len(tags)}){when}", flush=True)
        scorer = load_scorer(str(run), pick_device(), tag=tag)
        out.append(np.concatenate(score_windows(scorer, windows, batch_size, eos, tag)))
        release(scorer)
    print(f"megaslm: scored {len(tags)} checkpoints | {progress.text(len(tags))}", flush=True)
    return np.stack(out)


def analyze_dynamics(run_dir: str, data: list[str], out: str, *, reference: str | None = None, n_tokens: int = 8192,
                     threshold: float | None = None, ratio: float | None = None, text_field: str = "text",
                     batch_size: int = 8) -> dict:
    t0 = time.time()
    run = Path(run_dir)
    if n_tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {n_tokens}")
    tags = kept_checkpoints(run)
    cfg = run_files.run_config(run)
    hf = json.loads((run / "hf_config" / "config.json").read_text())
    tok = run_tokenizer(run)
    eos = tok.eos_id if tok else int(hf["eos_token_id"])
    stream = token_stream(data, tok, int(hf["vocab_size"]), n_tokens, text_field, str(run))
    if len(stream) < 2:
        raise UserError(f"--data {' '.join(data)} holds fewer than 2 tokens")
    windows = _sample_windows(stream, int(cfg["train"]["seq_len"]))
    losses = _score_checkpoints(run, tags, windows, eos, batch_size)
    thr = float(losses[-1].mean()) if threshold is None else float(threshold)
    cats = categorize(losses[0], losses[-1], thr)
    steps = [int(t.split("_")[1]) for t in tags]
    rows = category_rows(steps, losses, cats)

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    write_text(dest / "dynamics.csv", _csv(rows))
    buf = io.BytesIO()
    np.savez(buf, steps=np.asarray(steps), token_ids=stream[1:], losses=losses.astype(np.float32))
    write_bytes(dest / "token_losses.npz", buf.getvalue())
    selection = None
    if reference:
        ratio = ratio if ratio is not None else float((cfg.get("slm") or {}).get("ratio", 0.6))
        selection = _selection(reference, windows, losses[-1], cats, ratio, batch_size, eos, int(hf["vocab_size"]))
        write_text(dest / "selection.csv", _csv(selection))
    plot(rows, selection, dest / "dynamics.png",
         f"{run.name}: {losses.shape[1]} held-out tokens, threshold {thr:.2f} nats")
    counts = {name: int((cats == k).sum()) for k, name in enumerate(CATEGORIES)}
    if selection:  # JSON has no NaN: an empty category has no fraction
        selection = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in selection]
    summary = {"run_dir": str(run), "steps": steps, "threshold": thr, "counts": counts, "selection": selection,
               "ratio": ratio if reference else None, "seconds": time.time() - t0}
    write_json(dest / "dynamics.json", summary)
    log_media(run, {"analyze/dynamics": dest / "dynamics.png"})
    return summary
