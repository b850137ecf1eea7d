"""Model presets: architecture only (random init), built from transformers' own config classes."""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, PretrainedConfig

from megaslm.errors import UserError

# Sizes follow the published configs of each model; the vocabulary follows the shards unless set.
_PRESETS = {
    # CPU demo / tests: ~1.3M parameters with a 512-token vocabulary.
    "tiny": (LlamaConfig, dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048)),
    "tinyllama-1.1b": (LlamaConfig, dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                         num_attention_heads=32, num_key_value_heads=4,
                                         max_position_embeddings=2048, rope_theta=10000.0)),
    "llama2-7b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32,
                                    max_position_embeddings=4096, rope_theta=10000.0)),
    "mistral-7b": (MistralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=32768, rope_theta=10000.0, sliding_window=None)),
}


def preset_config(name: str, vocab_size: int, eos_id: int | None = None, bos_id: int | None = None) -> PretrainedConfig:
    if name not in _PRESETS:
        raise UserError(f"model.preset: unknown preset {name!r} (known: {', '.join(_PRESETS)})")
    cls, kw = _PRESETS[name]
    cfg = cls(vocab_size=vocab_size, tie_word_embeddings=False, rms_norm_eps=1e-5, attention_dropout=0.0,
              initializer_range=0.02, **kw)
    if eos_id is not None:
        cfg.eos_token_id = eos_id
    if bos_id is not None:
        cfg.bos_token_id = bos_id
    cfg.pad_token_id = None
    return cfg
