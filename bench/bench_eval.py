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
import os
import resource
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face directory")
    ap.add_argument("--tiny", action="store_true", help="build a random tiny Llama instead")
    ap.add_argument("--tasks", default="arc_easy,sciq,gsm8k_bpb")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not a.model and not a.tiny:
        ap.error("give --model DIR or --tiny")
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from megaslm.eval.run import load_model, make_lm, results_table
    from megaslm.eval.tasks import load_tasks, parse_tasks

    model = a.model or str(tiny_model(Path(tempfile.mkdtemp(prefix="bench_eval_"))))
    names = parse_tasks(a.tasks)
    print(f"model {model}, tasks {names}, limit {a.limit}, torch threads {torch.get_num_threads()}")

    rows = {}
    lm, tok, _, _ = load_model(model, None)
    ours = make_lm(lm, tok, a.batch_tokens, progress=False)
    loaded = load_tasks(names)
    t0 = time.time()
    raw = evaluate(ours, loaded, limit=a.limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    rows["megaslm adapter"] = (time.time() - t0, results_table(loaded, raw), f"batch_tokens {a.batch_tokens}")
    del ours, lm

    theirs = HFLM(pretrained=model, dtype="float32", batch_size=a.hf_batch_size, device="cpu")
    loaded = load_tasks(names)
    t0 = time.time()
    raw = evaluate(theirs, loaded, limit=a.limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    rows["lm-eval hf"] = (time.time() - t0, results_table(loaded, raw), f"batch_size {a.hf_batch_size}")

    metrics = [(t, m) for t in names for m in next(iter(rows.values()))[1][t] if m != "n"]
    print("| backend | batching | seconds | " + " | ".join(f"{t} {m}" for t, m in metrics) + " |")
    print("|---|---|---|" + "---|" * len(metrics))
    for name, (sec, table, batching) in rows.items():
        print(f"| {name} | {batching} | {sec:.1f} | " + " | ".join(f"{table[t][m]:.4f}" for t, m in metrics) + " |")
    base = rows["lm-eval hf"][0]
    print(f"adapter / hf time: {rows['megaslm adapter'][0] / base:.2f}; peak RSS of this process "
          f"{peak_rss_mib():.0f} MiB (both backends)")


if __name__ == "__main__":
    main()
