"""Cost of document masking on the CPU: forward + backward of the model with the loss head, packed sequences
with and without `position_ids` that restart at every document (transformers then builds a block-diagonal
causal mask instead of using the plain causal path).

    python bench/bench_document_mask.py            # Llama 4 x 256, vocab 8000, batch 4, seq 256 and 1024
    python bench/bench_document_mask.py --quick    # seq 128, seconds

Documents are 20-400 tokens long (uniform), EOS between them, like packed pretraining text. Both variants run
side by side in one process on the same batch, alternating, best of `--repeat` timings each; one thread.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from megaslm.data.loader import document_positions
from megaslm.model.build import TokenLossModel

EOS = 2


def packed_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq))
    for r in range(batch):
        p = int(rng.integers(0, 400))
        while p < seq:
            ids[r, p] = EOS
            p += int(rng.integers(20, 401))
    ids = torch.from_numpy(ids)
    return ids, ids.roll(-1, 1), torch.from_numpy(document_positions(ids.numpy(), EOS))


def step_time(model, ids, labels, pos) -> float:
    t0 = time.perf_counter()
    model(ids, labels, pos).sum().backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.seq, a.repeat = [128], 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 2.6875),
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                      max_position_embeddings=max(a.seq), tie_word_embeddings=False)
    lm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = TokenLossModel(lm)
    print(f"Llama {a.layers} x {a.hidden}, vocab {a.vocab}, batch {a.batch}, fp32, 1 thread; forward + backward, "
          f"best of {a.repeat}")
    print(f"{'attn':>6} {'seq':>6} {'docs/row':>8} {'causal s':>9} {'doc-mask s':>10} {'ratio':>6}")
    for attn in a.attn:
        lm.set_attn_implementation(attn)
        for seq in a.seq:
            ids, labels, pos = packed_batch(a.batch, seq, a.vocab)
            docs = float((pos == 0).sum()) / a.batch
            step_time(model, ids, labels, None)  # warm-up, both paths
            step_time(model, ids, labels, pos)
            plain, masked = [], []
            for _ in range(a.repeat):  # alternate, so drift in machine load hits both
                plain.append(step_time(model, ids, labels, None))
                masked.append(step_time(model, ids, labels, pos))
            print(f"{attn:>6} {seq:>6} {docs:>8.1f} {min(plain):>9.3f} {min(masked):>10.3f} "
                  f"{min(masked) / min(plain):>6.2f}")


if __name__ == "__main__":
    main()
