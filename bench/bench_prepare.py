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
        hash_cost(inputs, tokenizer, root, mb)
        shards = ShardSet(os.path.join(root, "shards1"))
        for seq_len, batch in ((256, 8), (2048, 8)):
            loader = PackedLoader(shards, seq_len, batch, with_source=True)
            loader.next_batch()
            n = 200
            _, dt = timed(lambda: [loader.next_batch() for _ in range(n)])
            print(f"PackedLoader seq_len {seq_len} x {batch} with source: {dt / n * 1e3:.2f} ms/batch")
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _NoHash:
    """A hasher that hashes nothing: prepare as it was before content hashes."""

    def update(self, data) -> None:
        pass

    def digest(self) -> bytes:
        return b""

    def hexdigest(self) -> str:
        return "0"


REPEATS = 5


def hash_cost(inputs, tokenizer, root, mb) -> None:
    """The content hash's share of prepare's time: prepare (num_proc 1) with and without hashing, alternated
    REPEATS times side by side; and hashing the written shard bytes alone, against prepare's time."""
    from megaslm.data import shard_writer
    from megaslm.data.shard_format import content_hasher

    times = {"with hash": [], "without": []}
    for _ in range(REPEATS):
        for label in times:
            shard_writer.content_hasher = content_hasher if label == "with hash" else _NoHash
            out = os.path.join(root, "hashbench")
            _, dt = timed(prepare, inputs, tokenizer, out, num_proc=1)
            times[label].append(dt)
    shard_writer.content_hasher = content_hasher
    with_h, without = (sorted(times[k])[REPEATS // 2] for k in ("with hash", "without"))
    files = [os.path.join(out, f) for f in os.listdir(out) if not f.endswith(".json")]
    data = [open(f, "rb").read() for f in files]
    _, dt_hash = timed(lambda: [content_hasher().update(d) for d in data])
    nbytes = sum(len(d) for d in data)
    print(f"content hash: prepare num_proc=1 on {mb:.1f} MB: {with_h:.2f} s with, {without:.2f} s without (median "
          f"of {REPEATS} each, alternated): {100 * (with_h / without - 1):+.1f}%; hashing the {nbytes / 1e6:.1f} MB "
          f"written alone: {dt_hash * 1e3:.1f} ms = {100 * dt_hash / without:.2f}% of prepare")


if __name__ == "__main__":
    main()
