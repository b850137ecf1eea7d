"""megaslm.model.describe against independent figures: published parameter counts, the closed-form Llama count,
what autograd really saves in a decoder layer, and the callers that now read it."""

from __future__ import annotations

import pytest
import torch

from megaslm.model.describe import describe, describe_module
from megaslm.model.presets import preset_config

# Published totals (Hugging Face model cards / config-derived, untied head, 32000-token vocabulary).
PUBLISHED = {"tinyllama-1.1b": 1_100_048_384, "llama2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096}


def closed_form_llama(c) -> int:
    h, i, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two RMSNorms
    return 2 * v * h + layers * per_layer + h  # embedding, untied head, layers, final norm


@pytest.mark.parametrize("preset", ["tiny", "tinyllama-1.1b", "llama2-7b", "mistral-7b"])
def test_param_counts_match_closed_form_and_published(preset):
    c = preset_config(preset, 32000)
    d = describe(c)
    assert d.params == closed_form_llama(c)
    if preset in PUBLISHED:
        assert d.params == PUBLISHED[preset]
    assert d.embedding == d.lm_head == 32000 * c.hidden_size
    assert d.params == d.embedding + d.lm_head + d.layers * d.per_layer + c.hidden_size
    assert d.largest_module == d.embedding  # ZeRO-3's gathered working set is the widest module
    assert d.max_position_embeddings == c.max_position_embeddings
    assert d.bytes("bf16") == 2 * d.params and d.bytes(torch.float32) == 4 * d.params


def test_live_model_and_summary_agree_with_meta():
    from megaslm.model.build import model_summary
    from transformers import AutoModelForCausalLM

    c = preset_config("tiny", 512)
    lm = AutoModelForCausalLM.from_config(c)
    assert describe_module(lm) == describe(c)
    assert model_summary(lm) == {"params": sum(p.numel() for p in lm.parameters()), "layers": 4, "hidden": 128,
                                 "vocab_size": 512, "arch": "LlamaForCausalLM"}


def test_flops_and_reference_bytes_read_describe(tmp_path):
    from megaslm.monitor import flops_per_token
    from megaslm.reference import reference_bytes

    c = preset_config("tinyllama-1.1b", 32000)
    d = describe(c)
    assert flops_per_token(d.params, d.layers, d.hidden, 2048) == d.train_flops_per_token(2048)
    assert d.train_flops_per_token(2048) == 6 * 1_100_048_384 + 12 * 22 * 2048 * 2048
    assert d.forward_flops_per_token(2048) == pytest.approx(2 * 1_100_048_384 + 4 * 22 * 2048 * 2048)
    c.save_pretrained(tmp_path)
    assert reference_bytes(str(tmp_path), torch.bfloat16) == 2 * 1_100_048_384


def _saved_bytes(fn, exclude) -> int:
    """Bytes of distinct storages autograd saves during fn(), parameters excluded."""
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_layer_activation_formula_matches_saved_tensors():
    """The per-token formula equals what a real Llama decoder layer (GQA, bf16, SDPA) saves, within RoPE's
    cos/sin tables (a few bytes per token that the formula leaves out)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    c = preset_config("tiny", 512)
    c.num_key_value_heads = 2
    lm = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16)
    B, T = 2, 64
    x = torch.randn(B, T, c.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(T)[None]
    pe = lm.model.rotary_emb(x, pos)
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    measured = _saved_bytes(lambda: lm.model.layers[0](x, position_embeddings=pe, attention_mask=None,
                                                       position_ids=pos), params) / (B * T)
    formula = describe(c).layer_activation_bytes_per_token("bf16")
    assert formula <= measured <= formula * 1.03, (formula, measured)
