"""megaslm's lm-eval adapter against lm-eval's own `hf` backend: the same model, tasks and requests, side by side.

Both run lm-eval's evaluator on the same task dict (megaslm's built-in YAMLs, --limit first examples); the figure
is the wall time of the evaluation (model loading apart), with the accuracy of each as a check that they scored
the same thing. Prints figures, asserts nothing.

    python bench/smollm2_hf.py --out /tmp/smollm2-135m          # once: SmolLM2-135M as a Hugging Face directory
    python bench/bench_eval.py --model /tmp/smollm2-135m --tasks arc_easy,sciq --limit 40
    python bench/bench_eval.py --tiny                            # a random tiny Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_model(dest: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.data.corpus import clean_documents
    from megaslm.data.tokenizer import train_tokenizer

    text = dest / "text.txt"
    text.write_text("\n".join(d["text"] for d in clean_documents(300_000, seed=0)))
    tok_dir = train_tokenizer([str(text)], 2000, str(dest / "tok"))
    from megaslm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=4096, eos_token_id=tok.eos_id,
                      bos_token_id=tok.bos_id)
    out = dest / "hf"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(str(out))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(backend: str, model: str, names: list[str], limit: int, hf_batch: int, batch_tokens: int) -> dict:
    """One backend in this process: seconds of lm-eval's evaluate, its table, this process's peak RSS."""
    from lm_eval.evaluator import evaluate

    from megaslm.eval.run import load_model, make_lm, results_table
    from megaslm.eval.tasks import load_tasks

    loaded = load_tasks(names)
    if backend == "megaslm":
        lm, tok, _, _ = load_model(model, None)
        lm_obj, batching = make_lm(lm, tok, batch_tokens, progress=False), f"batch_tokens {batch_tokens}"
    else:
        from lm_eval.models.huggingface import HFLM

        lm_obj, batching = HFLM(pretrained=model, dtype="float32", batch_size=hf_batch, device="cpu"), \
            f"batch_size {hf_batch}"
    rss0 = peak_rss_mib()
    t0 = time.time()
    raw = evaluate(lm_obj, loaded, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    return {"seconds": time.time() - t0, "table": results_table(loaded, raw), "batching": batching,
            "peak_rss_mib": peak_rss_mib(), "rss_before_mib": rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face directory")
    ap.add_argument("--tiny", action="store_true", help="build a random tiny Llama instead")
    ap.add_argument("--tasks", default="arc_easy,sciq,gsm8k_bpb")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--backend", choices=["megaslm", "hf"], help=argparse.SUPPRESS)  # one backend, JSON out
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not a.model and not a.tiny:
        ap.error("give --model DIR or --tiny")
    from megaslm.eval.tasks import parse_tasks

    names = parse_tasks(a.tasks)
    if a.backend:
        print("RESULT " + json.dumps(run_one(a.backend, a.model, names, a.limit, a.hf_batch_size, a.batch_tokens)))
        return
    import torch

    model = a.model or str(tiny_model(Path(tempfile.mkdtemp(prefix="bench_eval_"))))
    print(f"model {model}, tasks {names}, limit {a.limit}, torch threads {torch.get_num_threads()}, "
          f"each backend in its own process")
    rows = {}
    for backend, label in (("megaslm", "megaslm adapter"), ("hf", "lm-eval hf")):
        cmd = [sys.executable, __file__, "--model", model, "--tasks", a.tasks, "--limit", str(a.limit),
               "--hf-batch-size", str(a.hf_batch_size), "--batch-tokens", str(a.batch_tokens), "--backend", backend]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
        rows[label] = json.loads(line[-1][7:])
    metrics = [(t, m) for t in names for m in rows["megaslm adapter"]["table"][t] if m != "n"]
    print("| backend | batching | seconds | peak RSS MiB (before eval) | "
          + " | ".join(f"{t} {m}" for t, m in metrics) + " |")
    print("|---|---|---|---|" + "---|" * len(metrics))
    for name, r in rows.items():
        print(f"| {name} | {r['batching']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) | "
              + " | ".join(f"{r['table'][t][m]:.4f}" for t, m in metrics) + " |")
    print(f"adapter / hf time: {rows['megaslm adapter']['seconds'] / rows['lm-eval hf']['seconds']:.2f}")


if __name__ == "__main__":
    main()
