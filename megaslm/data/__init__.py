"""Data pipeline: raw text -> tokenizer -> token shards -> packed, sharded, resumable batches.

Modules: `readers` (streaming txt/jsonl/json/parquet/.gz readers), `tokenizer` (train/load SentencePiece
or Hugging Face tokenizers), `shards` (on-disk format, writer, reader), `prepare` (text -> shards),
`loader` (PackedLoader), `corpus` (demo corpora from text installed on this machine).
Heavy imports (torch, transformers, datasets) happen inside the modules that need them, so importing
this package is cheap.
"""

from megaslm.data.shards import ShardSet, ShardWriter, check_compatible
from megaslm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


def __getattr__(name: str):  # lazy: the loader pulls in torch
    if name == "PackedLoader":
        from megaslm.data.loader import PackedLoader
        return PackedLoader
    raise AttributeError(name)


# `prepare` is not re-exported: the name is also the submodule megaslm.data.prepare (import the function
# from there), and a package attribute would be shadowed by the submodule once imported.
__all__ = ["ShardSet", "ShardWriter", "check_compatible", "Tokenizer", "load_tokenizer", "train_tokenizer",
           "PackedLoader"]
