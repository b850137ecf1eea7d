"""What a model config costs, from the config alone: parameters, FLOPs per token, bytes, saved activations.

`describe(hf_config)` builds the Hugging Face model on the meta device (no memory, well under a second for 7B)
and counts its parameters; `describe_module(lm)` counts a live model, ZeRO-3 partitioned ones included (ds_numel).
Both return a `ModelDescription`. It is the one place where megaslm counts parameters and FLOPs: the trainer's
MFU (monitor.flops_per_token), the reference's placement (reference.reference_bytes), run_info's model summary
(build.model_summary) and `megaslm plan` all read it.

FLOPs convention (as the trainer's `mfu` metric): N counts every parameter, embeddings included; training is
6N + 12*L*H*T per token (PaLM, arXiv 2204.02311, appendix B: the attention-score matmuls at sequence length T),
a forward alone 2N + 4*L*H*T. Activation recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        return DTYPE_BYTES[dtype]
    return torch.tensor([], dtype=dtype).element_size()


def train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """6N for the weights (forward + backward) plus 12*L*H*T for the attention scores."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def forward_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """A third of training: 2N + 4*L*H*T (the reference model's cost per scored token)."""
    return train_flops_per_token(n_params, n_layers, hidden, seq_len) / 3.0


@dataclass(frozen=True)
class ModelDescription:
    arch: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab_size: int
    max_position_embeddings: int | None
    params: int  # every parameter once (a tied head is not counted twice)
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    per_layer: int  # one decoder layer
    largest_module: int  # parameters of the largest single module (ZeRO-3 gathers one at a time)

    @property
    def non_embedding(self) -> int:
        return self.params - self.embedding

    def bytes(self, dtype: torch.dtype | str) -> int:
        return self.params * dtype_bytes(dtype)

    def train_flops_per_token(self, seq_len: int) -> float:
        return train_flops_per_token(self.params, self.layers, self.hidden, seq_len)

    def forward_flops_per_token(self, seq_len: int) -> float:
        return forward_flops_per_token(self.params, self.layers, self.hidden, seq_len)

    def layer_activation_bytes_per_token(self, dtype: torch.dtype | str = "bf16") -> int:
        """Bytes one Llama/Mistral decoder layer saves for backward per token (no recomputation).

        Counted from what autograd keeps (checked in tests against saved_tensors_hooks on a real layer): per RMSNorm
        an fp32 copy of its input (4H) and two H-wide tensors in the model dtype; for attention Q, K, V after RoPE
        and the output (SDPA's flash / memory-efficient kernel: no T x T scores) plus a per-head logsumexp; for the
        SwiGLU MLP four I-wide tensors. With dtype bytes d: 8H + d*(6H + 2*KV + 4I) + 4*heads + 8, KV = kv_heads *
        head_dim. This is the method of Korthikanti et al. (arXiv 2205.05198, section 4.1) applied to this layer.
        """
        d = dtype_bytes(dtype)
        kv = self.kv_heads * (self.hidden // self.heads)
        return 8 * self.hidden + d * (6 * self.hidden + 2 * kv + 4 * self.intermediate) + 4 * self.heads + 8

    def activation_bytes(self, tokens: int, dtype: torch.dtype | str = "bf16", checkpointing: bool = False) -> int:
        """Saved activations of a micro-batch of `tokens` tokens on one device (tensor parallel 1).

        Without checkpointing every layer keeps its activations. With it (one checkpoint per decoder layer, as
        `gradient_checkpointing_enable`), each layer keeps only its input (d*H per token) and one layer's
        activations exist again while it is recomputed in backward. The final norm keeps 4H + 2*d*H per token.
        """
        d = dtype_bytes(dtype)
        layer = self.layer_activation_bytes_per_token(dtype)
        per_token = (self.layers * d * self.hidden + layer) if checkpointing else self.layers * layer
        return tokens * (per_token + 4 * self.hidden + 2 * d * self.hidden)

    def summary(self) -> dict:
        """The run_info.json model entry."""
        return {"params": self.params, "layers": self.layers, "hidden": self.hidden, "vocab_size": self.vocab_size,
                "arch": self.arch}

    def to_dict(self) -> dict:
        return {**asdict(self), "non_embedding": self.non_embedding}


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitioned parameters hold 0 local elements


def count_params(m: nn.Module) -> int:
    """Parameter count that also works for ZeRO-3 partitioned parameters (ds_numel)."""
    return sum(_numel(p) for p in m.parameters())


def describe_module(lm: nn.Module) -> ModelDescription:
    """Count a Hugging Face causal LM (meta, live, or ZeRO-3 partitioned)."""
    c = lm.config
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight if lm.get_output_embeddings() is not None else emb
    layers = lm.get_decoder().layers
    largest = max(sum(_numel(p) for p in m.parameters(recurse=False)) for m in lm.modules())
    heads = c.num_attention_heads
    return ModelDescription(
        arch=type(lm).__name__, layers=c.num_hidden_layers, hidden=c.hidden_size,
        intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size), heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads, vocab_size=c.vocab_size,
        max_position_embeddings=getattr(c, "max_position_embeddings", None), params=count_params(lm),
        embedding=_numel(emb), lm_head=0 if head is emb else _numel(head),
        per_layer=count_params(layers[0]) if len(layers) else 0, largest_module=largest)


def describe(hf_config) -> ModelDescription:
    """Describe a Hugging Face config without allocating its weights (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config)
    return describe_module(lm)
