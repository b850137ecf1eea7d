"""Data-pipeline figures: demo corpus build, tokenizer training, prepare throughput (num_proc 1 and 2),
loader batch latency. Prints numbers, asserts nothing.

    python bench/bench_prepare.py [--clean-bytes N] [--noisy-bytes N] [--vocab V] [--copies K]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from megaslm.data.corpus import build_demo_corpora
from megaslm.data.loader import PackedLoader
from megaslm.data.prepare import prepare
from megaslm.data.shards import ShardSet
from megaslm.data.tokenizer import load_tokenizer, train_tokenizer


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clean-bytes", type=int, default=1_500_000)
    p.add_argument("--noisy-bytes", type=int, default=3_000_000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--copies", type=int, default=4, help="inputs for prepare = the noisy corpus K times")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench_prepare-")
    try:
        paths, dt = timed(build_demo_corpora, os.path.join(root, "corpus"), a.clean_bytes, a.noisy_bytes, 200_000)
        print(f"build_demo_corpora: {dt:.1f} s")
        tok, dt = timed(train_tokenizer, [paths["clean_train"]], a.vocab, os.path.join(root, "tok"))
        print(f"train_tokenizer vocab {a.vocab} on {os.path.getsize(paths['clean_train']) / 1e6:.1f} MB: {dt:.1f} s")
        tokenizer = load_tokenizer(tok)
        inputs = [paths["noisy_train_clean"], paths["noisy_train_noise"]] * a.copies
        mb = sum(os.path.getsize(f) for f in inputs) / 1e6
        for n in (1, 2):
            meta, dt = timed(prepare, inputs, tokenizer, os.path.join(root, f"shards{n}"), num_proc=n)
            print(f"prepare num_proc={n}: {mb:.1f} MB -> {meta['num_tokens'] / 1e6:.2f} M tokens in {dt:.1f} s "
                  f"({meta['num_tokens'] / dt / 1e6:.2f} M tokens/s, {mb / dt:.1f} MB/s)")
        shards = ShardSet(os.path.join(root, "shards1"))
        for seq_len, batch in ((256, 8), (2048, 8)):
            loader = PackedLoader(shards, seq_len, batch, with_source=True)
            loader.next_batch()
            n = 200
            _, dt = timed(lambda: [loader.next_batch() for _ in range(n)])
            print(f"PackedLoader seq_len {seq_len} x {batch} with source: {dt / n * 1e3:.2f} ms/batch")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
