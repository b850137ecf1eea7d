"""The reference-loss cache format read back by CachedReference: float16 and float32 storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SEQ = 32


def write_cache(root, shards, values: np.ndarray, storage_dtype: str, chunk_sequences: int = 64):
    from megaslm.reference.cache import (META_FILE, STORAGE_DTYPES, cache_meta, chunk_file, chunk_rows,
                                         write_json_synced, write_chunk)

    n_seq = values.shape[0]
    (root / "chunks").mkdir(parents=True)
    for c in range(-(-n_seq // chunk_sequences)):
        lo, hi = chunk_rows(c, chunk_sequences, n_seq)
        write_chunk(chunk_file(root, c), values[lo:hi].astype(STORAGE_DTYPES[storage_dtype]))
    write_json_synced(root / META_FILE, cache_meta(
        seq_len=SEQ, num_sequences=n_seq, chunk_sequences=chunk_sequences, storage_dtype=storage_dtype,
        compute_dtype="float32", shards=shards, reference={"path": "none"}, world_size=1))


@pytest.mark.parametrize("storage_dtype", ["float16", "float32"])
def test_cache_round_trip(tmp_path, tiny_data, storage_dtype):
    from megaslm.data.loader import PackedLoader
    from megaslm.data.shards import ShardSet
    from megaslm.reference import CachedReference

    shards = ShardSet(tiny_data["valid"])
    n_seq = (shards.num_tokens - 1) // SEQ
    values = np.random.default_rng(0).uniform(0, 12, (n_seq, SEQ)).astype(np.float32)
    write_cache(tmp_path / "c", shards, values, storage_dtype)
    cache = CachedReference(str(tmp_path / "c"), shards, SEQ)
    want = values.astype(storage_dtype).astype(np.float32)  # exactly the stored values, widened
    batch = PackedLoader(shards, SEQ, 4, seed=3).next_batch()
    got = cache.losses_for(batch)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want[batch["index"].numpy()])
    # float16 keeps 11 significant bits: every loss within 2^-11 relative of the float32 value.
    np.testing.assert_allclose(got.numpy(), values[batch["index"].numpy()], rtol=2.0**-11, atol=0)
    if storage_dtype == "float16":
        assert (got.numpy() != values[batch["index"].numpy()]).any()  # the rounding is real
    np.testing.assert_array_equal(cache.token_losses(1, 1 + 3 * SEQ), want[:3].reshape(-1))
