"""Names and constants of the shard-set format (documented in megaslm/data/shards.py), shared by the writer
(shard_writer.py) and the reader (shards.py)."""

from __future__ import annotations

import numpy as np

from megaslm import atomic

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
_TOKENS = "tokens_{:05d}.bin"
_MASK = "mask_{:05d}.bin"
_DOCS = "docs_{:05d}.npy"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    """Storage dtype name for a vocabulary size."""
    return "uint16" if vocab_size <= 65535 else "uint32"


def _ours(name: str) -> bool:
    return name == META_FILE or (name.startswith(("tokens_", "docs_", "mask_"))
                                 and name.endswith((".bin", ".npy", ".partial")))


def _is_replaceable(path: str) -> bool:
    """True if `path` may be replaced by a new shard set: absent, empty, or itself a shard set (or the
    remains of one). Anything else is the user's directory and is left alone."""
    return atomic.is_replaceable(path, _ours)


HASH_KEY = "content_blake2b"  # per shard in meta.json: blake2b-128 of its tokens, document index and mask


def content_hasher():
    """The hash of shard contents (blake2b, 128 bits: fast in software, collision-safe for identity)."""
    import hashlib

    return hashlib.blake2b(digest_size=16)


def set_hash(shards: list[dict]) -> str | None:
    """One hash of a shard set's content: of its shards' hashes, in order (None when a shard has none)."""
    h = content_hasher()
    for s in shards:
        if not s.get(HASH_KEY):
            return None
        h.update(s[HASH_KEY].encode())
    return h.hexdigest()
