"""The online reference: a frozen Hugging Face model scoring every training batch (the package docstring lists
the other sources).

`OnlineReference` runs the model beside the trained one, in the same processes, as a DeepSpeed engine with no
optimizer (ZeRO-inference); `losses(input_ids, labels)` and `losses_for(batch)` give float32 [B, T]. Placement:
  replicated     every rank holds the whole model in the training precision (no all-gathers per forward)
  zero3          parameters partitioned over the data-parallel ranks, gathered layer by layer
  zero3_offload  as zero3, with the partitions kept in CPU memory
  auto           replicated if the weights take at most 20% of one device's memory, else zero3
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from megaslm.config import REPO_ROOT
from megaslm.errors import UserError
from megaslm.model.build import TokenLossModel, load_hf_config, zero_stage
from megaslm.model.describe import describe, describe_module
from megaslm.reference.base import ModelReference

AUTO_FRACTION = 0.2

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
    return auto_placement(reference_bytes(path, dtype) / tp_size, total)


def auto_placement(weight_bytes: float, device_bytes: float) -> str:
    """What `auto` means (training and `megaslm plan` alike): replicated when one rank's share of the reference's
    weights is at most AUTO_FRACTION of a device's memory, else zero3."""
    return "replicated" if weight_bytes <= AUTO_FRACTION * device_bytes else "zero3"


class OnlineReference(ModelReference):
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
        self.description = describe_module(lm)  # before AutoTP shards it
        model = TokenLossModel(lm, tp_group=tp_group, chunk_size=chunk_size,
                               zero3=self.placement.startswith("zero3"))
        self.scorer, *_ = deepspeed.initialize(model=model, config=ds, mpu=mpu)  # the DeepSpeed engine
        self.scorer.eval()
        self.config = lm.config

