"""Reference-model token losses for Selective Language Modeling.

The trainer only sees `ReferenceLosses.losses_for(batch) -> float32 [B, T]` (batch: the loader's dict with
input_ids, labels, index), built by `make_reference(cfg, ...)`. Two implementations:
- `CachedReference` reads losses that `megaslm score` computed once (megaslm/score.py) from `reference.cache`:
  no reference model in memory during training, and one scoring serves every model trained on the corpus.
- `OnlineReference` runs a frozen Hugging Face model beside the trained one, in the same processes, as a
  DeepSpeed engine with no optimizer (ZeRO-inference); it also has `losses(input_ids, labels)`. Placement:
  replicated     every rank holds the whole model in the training precision (no all-gathers per forward)
  zero3          parameters partitioned over the data-parallel ranks, gathered layer by layer
  zero3_offload  as zero3, with the partitions kept in CPU memory
  auto           replicated if the weights take at most 20% of one device's memory, else zero3
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from megaslm import score as cache_format
from megaslm.config import REPO_ROOT
from megaslm.errors import UserError
from megaslm.model.build import TokenLossModel, count_params, load_hf_config, zero_stage
from megaslm.model.describe import describe

AUTO_FRACTION = 0.2


class ReferenceLosses(Protocol):
    placement: str  # how the reference is held ("cache" for CachedReference), for run_info
    n_params: int  # parameters run per training token (0 for a cache), for the FLOPs estimate

    def losses_for(self, batch: dict) -> torch.Tensor: ...


def check_reference_tokenizer(path: str, vocab_size: int, fingerprint: str | None, shards_dir: str) -> None:
    """The reference must score the same token ids: same vocabulary size and, when known, the same tokenizer."""
    cfg = load_hf_config(path)
    if cfg.vocab_size != vocab_size:
        raise UserError(f"reference.path {path} has vocab_size {cfg.vocab_size} but the training shards "
                        f"{shards_dir} have vocab_size {vocab_size}: the reference must share the tokenizer")
    from megaslm.data.tokenizer import load_tokenizer

    p = Path(path)
    if fingerprint and ((p / "tokenizer.model").exists() or (p / "tokenizer.json").exists()):
        ref_fp = load_tokenizer(str(p)).fingerprint
        if ref_fp != fingerprint:
            raise UserError(f"reference.path {path} has tokenizer sha256 {ref_fp[:12]} but the training shards "
                            f"{shards_dir} were tokenized with sha256 {fingerprint[:12]}: the reference must "
                            "share the tokenizer")


def reference_bytes(path: str, dtype: torch.dtype) -> int:
    return describe(load_hf_config(path)).bytes(dtype)


def choose_placement(placement: str, path: str, dtype: torch.dtype, tp_size: int = 1) -> str:
    """`auto` resolved by the share of the weights one rank holds (tensor parallelism splits most of them)."""
    if placement != "auto":
        return placement
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    return "replicated" if reference_bytes(path, dtype) / tp_size <= AUTO_FRACTION * total else "zero3"


class OnlineReference:
    """A frozen reference model as a DeepSpeed inference engine; see the module docstring for placement."""

    def __init__(self, path: str, placement: str, *, dtype: torch.dtype, micro_batch_size: int, dp_size: int,
                 mpu=None, tp_group=None, tp_size: int = 1, chunk_size: int | None = None):
        import deepspeed

        self.placement = choose_placement(placement, path, dtype, tp_size)
        ds = json.loads((REPO_ROOT / "ds_configs" / f"reference_{self.placement}.json").read_text())
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = micro_batch_size * dp_size
        ds["bf16"] = {"enabled": dtype == torch.bfloat16}
        if tp_size > 1:  # blocks and LM head sharded like the trained model's, on the same groups
            from megaslm.parallel import tensor as tp

            tp.check_parallel_setup(tp_size, tp_size, zero_stage(ds), f"reference.placement {self.placement}",
                                    "use reference.placement replicated (tensor parallelism shards it) or "
                                    "parallel.tensor=1")
            tp.check_model_config(load_hf_config(path), tp_size, f"reference model {path}")
            ds["tensor_parallel"] = tp.autotp_section(tp_size)
        keep = None
        if self.placement.startswith("zero3"):
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(ds)  # from_pretrained loads each rank's partition only
        try:
            lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise UserError(f"reference.path {path}: cannot load the model: {e}") from None
        finally:
            del keep
        lm.requires_grad_(False)
        lm.eval()
        self.n_params = count_params(lm)  # before AutoTP shards it
        model = TokenLossModel(lm, tp_group=tp_group, chunk_size=chunk_size,
                               zero3=self.placement.startswith("zero3"))
        self.engine, *_ = deepspeed.initialize(model=model, config=ds, mpu=mpu)
        self.engine.eval()
        self.config = lm.config

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.engine(input_ids, labels, position_ids).float()

    def losses_for(self, batch: dict) -> torch.Tensor:
        """`losses` of the loader's batch dict (input_ids, labels and position_ids already on the device)."""
        return self.losses(batch["input_ids"], batch["labels"], batch.get("position_ids"))


class CachedReference:
    """Reference losses read from a cache written by `megaslm score` (format: megaslm/score.py).

    Checked at construction, each failure a UserError naming both values: the cache is complete (meta.json), was
    scored at this seq_len, on this token stream (tokenizer, token and document counts, sampled content hash),
    its chunk files are all there with the right sizes, and, when `model_path` is given, with that very model.
    """

    placement = "cache"
    n_params = 0  # nothing runs per token during training

    def __init__(self, cache_dir: str, shards, seq_len: int, *, model_path: str | None = None):
        self.cache_dir = str(cache_dir)
        meta = cache_format.read_meta(cache_dir)
        self.meta = meta
        where = f"reference.cache {cache_dir}"
        if meta["seq_len"] != int(seq_len):
            raise UserError(f"{where} was scored at seq_len {meta['seq_len']} but train.seq_len is {seq_len}: "
                            "score again with this seq_len (the cache is exact for one seq_len only)")
        have, want = meta["shards"], cache_format.shards_identity(shards)
        for key in ("tokenizer_fingerprint", "num_tokens", "num_documents", "content_sha256"):
            if have.get(key) != want[key]:
                raise UserError(f"{where} was scored on the shards {have.get('path')} ({key} {have.get(key)}) "
                                f"but data.train {shards.path} has {key} {want[key]}: not the same token stream")
        if model_path:
            fp = cache_format.model_fingerprint(model_path)
            cached = meta["reference"].get("fingerprint")
            if fp != cached:
                raise UserError(f"{where} was scored with the reference model {meta['reference'].get('path')} "
                                f"(fingerprint {str(cached)[:12]}) but reference.path {model_path} has fingerprint "
                                f"{fp[:12]}: score again with this model, or drop reference.path")
        self.seq_len = int(seq_len)
        self.num_sequences = int(meta["num_sequences"])
        self.chunk_sequences = int(meta["chunk_sequences"])
        self._dtype = cache_format.STORAGE_DTYPES[meta["storage_dtype"]]
        self._files = []
        for c in range(int(meta["num_chunks"])):
            f = cache_format.chunk_file(cache_dir, c)
            lo, hi = cache_format.chunk_rows(c, self.chunk_sequences, self.num_sequences)
            size = (hi - lo) * self.seq_len * self._dtype.itemsize
            if not f.is_file() or f.stat().st_size != size:
                raise UserError(f"{where}: chunk file {f} is missing or not {size} bytes; the cache is damaged, "
                                "score again")
            self._files.append(str(f))

    def sequences(self, index) -> np.ndarray:
        """float32 [len(index), seq_len]: the cached losses of the labels of sequences `index` (all >= 0)."""
        T, C = self.seq_len, self.chunk_sequences
        out = np.empty((len(index), T), np.float32)
        for k, i in enumerate(np.asarray(index, dtype=np.int64).reshape(-1)):
            if not 0 <= i < self.num_sequences:
                raise UserError(f"reference.cache {self.cache_dir} covers sequences 0..{self.num_sequences - 1} "
                                f"of seq_len {T}; sequence {i} is not in it")
            c, r = divmod(int(i), C)
            out[k] = np.fromfile(self._files[c], dtype=self._dtype, count=T, offset=r * T * self._dtype.itemsize)
        return out

    def token_losses(self, start: int, end: int) -> np.ndarray:
        """float32 losses of stream positions [start, end) (the loss of predicting token p); NaN where the cache
        does not cover a position (position 0 and the tail after num_sequences * seq_len)."""
        out = np.full(max(0, end - start), np.nan, np.float32)
        lo, hi = max(start, 1), min(end, self.num_sequences * self.seq_len + 1)
        p = lo
        while p < hi:  # position p is row (p-1) // T, column (p-1) % T
            i, j = divmod(p - 1, self.seq_len)
            n = min(hi - p, self.seq_len - j)
            out[p - start:p - start + n] = self.sequences([i])[0, j:j + n]
            p += n
        return out

    def losses_for(self, batch: dict) -> torch.Tensor:
        """float32 [B, T] on labels' device: the cached losses of rows with index >= 0, zeros for padding rows
        (index -1) and for labels == -100, like OnlineReference."""
        labels = batch["labels"]
        if labels.shape[-1] != self.seq_len:
            raise ValueError(f"batch seq_len {labels.shape[-1]} != cache seq_len {self.seq_len}")
        index = batch["index"].detach().cpu().numpy().reshape(-1)
        out = np.zeros(tuple(labels.shape), np.float32)
        rows = np.nonzero(index >= 0)[0]
        if len(rows):
            out[rows] = self.sequences(index[rows])
        out[labels.detach().cpu().numpy() == -100] = 0.0
        if np.isnan(out).any():
            k = int(np.argwhere(np.isnan(out))[0][0])
            raise UserError(f"reference.cache {self.cache_dir} holds no loss for a token of sequence {index[k]}")
        return torch.from_numpy(out).to(labels.device)


def make_reference(cfg, *, shards, dtype: torch.dtype, micro_batch_size: int, dp_size: int, mpu=None,
                   tp_group=None, tp_size: int = 1, vocab_size: int | None = None):
    """The reference of an SLM run: a `CachedReference` when reference.cache holds a complete cache, else an
    `OnlineReference` of reference.path (a missing cache with no reference.path is a UserError). When both are
    set, the cache must have been scored with reference.path's model."""
    r = cfg.reference
    if r.cache:
        if cache_format.is_complete(r.cache) or not r.path:
            return CachedReference(r.cache, shards, cfg.train.seq_len, model_path=r.path)
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megaslm: reference.cache {r.cache} holds no complete cache; running the reference "
                  f"{r.path} online (score it first with `megaslm score`)", flush=True)
    if not r.path:
        raise UserError("reference.path is required when objective is slm and reference.cache is not set")
    check_reference_tokenizer(r.path, vocab_size or shards.vocab_size, shards.fingerprint, shards.path)
    return OnlineReference(r.path, r.placement, dtype=dtype, micro_batch_size=micro_batch_size, dp_size=dp_size,
                           mpu=mpu, tp_group=tp_group, tp_size=tp_size)
