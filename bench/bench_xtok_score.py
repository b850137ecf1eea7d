"""`megaslm score` throughput with a reference of another tokenizer vs one of the shards' own tokenizer.

Both references are the same architecture with the same vocabulary size and random weights (the cost does not
depend on the weights): one uses the shards' SentencePiece tokenizer (today's path: windows scored as they are),
the other a byte-level BPE tokenizer trained on the same text (documents decoded, tokenized, scored, carried
back by bytes: megaslm/reference/score_docs.py). Both are run one after the other, in one invocation, on the
same shards; the figure is trained-model tokens scored per second, as `megaslm score` prints it.

    python bench/bench_xtok_score.py [--chars 2000000] [--vocab 4096] [--preset tiny] [--seq-len 256] \
        [--hidden 512 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(root: Path, chars: int, vocab: int, preset: str, hidden: int | None, layers: int | None) -> dict:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from megaslm.data.corpus import clean_documents
    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import load_tokenizer, train_tokenizer
    from megaslm.model.presets import preset_config

    docs = [d["text"] for d in clean_documents(chars, seed=0)]
    with open(root / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    train_tokenizer([str(root / "docs.jsonl")], vocab, str(root / "tok"))
    prepare([str(root / "docs.jsonl")], str(root / "tok"), str(root / "shards"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(root / "bpe"))
    # Reference tokens per trained token: the forward's work per trained token differs by this much.
    n_trained = sum(len(x) + 1 for x in load_tokenizer(str(root / "tok")).encode_batch(docs))
    n_bpe = sum(len(x) + 1 for x in load_tokenizer(str(root / "bpe")).encode_batch(docs))
    refs = {"_ref_tokens_per_trained_token": n_bpe / n_trained}
    for name, tok_dir in (("same tokenizer", root / "tok"), ("another tokenizer", root / "bpe")):
        tok = load_tokenizer(str(tok_dir))
        torch.manual_seed(0)
        out = root / name.replace(" ", "_")
        cfg = preset_config(preset, max(vocab, tok.vocab_size), eos_id=tok.eos_id)
        if hidden:  # a wider model: the same share of attention heads and MLP
            cfg.hidden_size, cfg.intermediate_size = hidden, hidden * 8 // 3
            cfg.head_dim = hidden // cfg.num_attention_heads
        cfg.num_hidden_layers = layers or cfg.num_hidden_layers
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
        tok.save_pretrained(str(out))
        refs[name] = str(out)
    return refs


def score(root: Path, ref: str, seq_len: int, mb: int) -> float:
    cache = root / f"cache_{Path(ref).name}"
    cfg = {"run": {"dir": str(root / "run")}, "data": {"train": str(root / "shards"), "tokenizer": str(root / "tok")},
           "train": {"seq_len": seq_len, "micro_batch_size": mb}, "objective": "slm",
           "reference": {"path": ref, "cache": str(cache), "placement": "replicated"}, "wandb": {"mode": "disabled"},
           "model": {"dtype": "fp32"}}
    path = root / f"{Path(ref).name}.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    res = subprocess.run([sys.executable, "-m", "megaslm.cli", "score", str(path), "--force"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    m = re.search(r"done: \d+ sequences \((\d+) tokens\) scored in ([\d.]+) s", res.stdout)
    if res.returncode or not m:
        sys.exit(f"score failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return int(m.group(1)) / float(m.group(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=2_000_000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=None, help="hidden size instead of the preset's")
    p.add_argument("--layers", type=int, default=None, help="layers instead of the preset's")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        refs = build(root, a.chars, a.vocab, a.preset, a.hidden, a.layers)
        per = refs.pop("_ref_tokens_per_trained_token")
        tps = {name: score(root, ref, a.seq_len, a.micro_batch) for name, ref in refs.items()}
    same, other = tps["same tokenizer"], tps["another tokenizer"]
    arch = f"hidden {a.hidden or 'as preset'}, layers {a.layers or 'as preset'}"
    print(f"megaslm score, preset {a.preset} ({arch}), seq_len {a.seq_len}, micro-batch {a.micro_batch}, vocab {a.vocab}, "
          f"{a.chars} characters, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"  same tokenizer     {same:10.0f} trained tokens/s")
    print(f"  another tokenizer  {other:10.0f} trained tokens/s   ({same / other:.2f}x the time per trained token)")
    print(f"  the other tokenizer gives {per:.3f} reference tokens per trained token: per reference token scored, "
          f"the cross-tokenizer path takes {same / (other * per):.2f}x the time (decoding, tokenizing, aligning)")


if __name__ == "__main__":
    main()
