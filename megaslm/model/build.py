"""Build the Hugging Face model (preset or local checkpoint) and wrap it with the per-token loss head.

The Hugging Face model is used as it is. `TokenLossModel` runs its decoder to the final hidden states and hands
them, with the LM head's weight (or this tensor-parallel rank's rows of it), to `per_token_ce`, so full logits
are never materialised. Under ZeRO-3 the model is created partitioned: never whole on one rank.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from megaslm.errors import UserError
from megaslm.loss import per_token_ce
from megaslm.loss.per_token_ce import vocab_range_of
from megaslm.model.describe import count_params, describe_module  # noqa: F401 (count_params re-exported)
from megaslm.model.presets import preset_config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def load_hf_config(path: str) -> PretrainedConfig:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad config.json
        raise UserError(f"{p / 'config.json'}: cannot be read as a model config: {e}") from None


def create_model(*, preset: str | None, init_from: str | None, vocab_size: int, ds_config: dict,
                 dtype: torch.dtype, eos_id: int | None = None, bos_id: int | None = None,
                 mpu=None) -> nn.Module:
    """Create the causal LM; partitioned at creation under ZeRO-3 (DeepSpeed's zero.Init / HfDeepSpeedConfig)."""
    stage3 = zero_stage(ds_config) == 3
    if init_from:
        hf_cfg = load_hf_config(init_from)
        if hf_cfg.vocab_size != vocab_size:
            raise UserError(f"model.init_from {init_from} has vocab_size {hf_cfg.vocab_size} but the shards have "
                            f"vocab_size {vocab_size}")
        keep = None
        if stage3:
            from transformers.integrations import HfDeepSpeedConfig

            keep = HfDeepSpeedConfig(ds_config)  # must stay alive during from_pretrained
        try:
            model = AutoModelForCausalLM.from_pretrained(init_from, local_files_only=True, dtype=dtype)
        finally:
            del keep
        return model
    cfg = preset_config(preset, vocab_size, eos_id=eos_id, bos_id=bos_id)
    ctx = contextlib.nullcontext()
    if stage3:
        import deepspeed

        # No dtype here: the config's bf16 flag decides. DeepSpeed 0.19's zero.Init turns an explicit dtype into
        # bfloat16 on accelerators without fp16 (the CPU): an fp32 run would hold bf16 parameters.
        ctx = deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu)
    with ctx:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    wrong = sorted({str(p.dtype) for p in model.parameters()} - {str(dtype)})
    if wrong:  # a silent precision change would make every loss figure of the run disagree with its export
        raise RuntimeError(f"model built with parameters in {', '.join(wrong)}, not the run's {dtype}")
    return model


def lm_head_weight(lm: nn.Module) -> nn.Parameter:
    return lm.get_output_embeddings().weight


class TokenLossModel(nn.Module):
    """forward(input_ids, labels, position_ids=None) -> float32 per-token cross-entropy [B, T] (0 where
    labels == -100).

    chunk_size, vocab_block, keep_bytes: the loss head's tiling and memory-for-speed budget (see per_token_ce;
    the config's `loss_head` section). Nothing is kept when no gradient is taken (the reference model).
    forward(..., fused=True): the caller will backpropagate `c * sum of the labelled tokens' losses` for one
    scalar c (CLM, SLM before slm.start_step): the head forms its gradients in the forward (fused_ce.py, 3 head
    matmuls instead of 4). Labels are not range-checked here (no host sync): the shards' vocabulary was checked
    against the model's when the run started; a label outside it would give a NaN loss.
    """

    def __init__(self, lm: nn.Module, tp_group=None, chunk_size: int | None = None, zero3: bool = False, *,
                 vocab_block: int | None = None, keep_bytes: int = 0):
        super().__init__()
        self.lm = lm
        self.tp_group = tp_group
        self.chunk_size, self.vocab_block, self.keep_bytes = chunk_size, vocab_block, keep_bytes
        # DeepSpeed AutoTP installs its own vocab-parallel loss on this hook when the head is vocab-sharded; it must
        # exist and be writable. It is never called: the loss is per_token_ce below.
        self.loss_function = None
        self._vocab_range = None  # (first id of this rank's head rows, full vocabulary), set on the first call
        if zero3:
            import deepspeed

            # The head's weight is used here, outside lm_head.forward: ask ZeRO-3 to gather it for our forward.
            deepspeed.zero.register_external_parameter(self, lm_head_weight(lm))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                head_outputs: tuple[str, ...] = (), fused: bool = False):
        """head_outputs: extra per-token outputs of the loss head, ("entropy",) or (); when any is asked for, the
        result is (losses, {name: [B, T]}). fused: the caller backpropagates a scalar times the labelled tokens'
        losses (CLM), so the head forms its gradients in the forward (3 head matmuls, no recompute)."""
        # position_ids that restart at document starts make transformers build a block-diagonal causal mask
        # (its packed-sequence path): document masking with the model untouched.
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        unknown = set(head_outputs) - {"entropy"}
        if unknown:
            raise ValueError(f"the loss head has no output {sorted(unknown)} (it has: entropy)")
        weight = lm_head_weight(self.lm)
        if self.tp_group is not None and self._vocab_range is None:  # arithmetic, not a collective per call
            self._vocab_range = vocab_range_of(self.lm.get_output_embeddings(), weight,
                                               int(self.lm.config.vocab_size), self.tp_group)
        out = per_token_ce(hidden, weight, labels, chunk_size=self.chunk_size, tp_group=self.tp_group,
                           vocab_block=self.vocab_block, keep_bytes=self.keep_bytes,
                           with_entropy="entropy" in head_outputs, grad_weights=labels != -100 if fused else None,
                           vocab_range=self._vocab_range, check_labels=False)
        return (out[0], {"entropy": out[1]}) if head_outputs else out


def model_summary(lm: nn.Module) -> dict:
    return describe_module(lm).summary()
