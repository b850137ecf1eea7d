"""Models for analysis and their per-token losses.

A model spec is either a Hugging Face directory (e.g. from `megaslm export`; its `megaslm_export.json`, when
present, names the run it came from) or a megaslm run directory (its latest complete checkpoint, consolidated as
`megaslm export` does). Losses come from the training loss head (`TokenLossModel`, i.e. `per_token_ce` on the
final hidden states), in fp32 on the CPU, or in the model's precision on a GPU when there is one.

A window is an int array of L + 1 token ids; its losses are the L cross-entropies of tokens 1..L given the
tokens before them in the window (as in training: input_ids = window[:-1], labels = window[1:]).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaslm.data.tokenizer import Tokenizer, load_tokenizer
from megaslm.errors import UserError
from megaslm.model.build import TokenLossModel
from megaslm.run_files import is_run_dir

IGNORE_INDEX = -100


@dataclass
class Scorer:
    spec: str  # as given on the command line
    model: TokenLossModel
    tokenizer: Tokenizer | None
    vocab_size: int
    run_dir: Path | None  # the run the model comes from (for wandb), when known
    device: torch.device


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")




def run_tokenizer(run_dir: Path) -> Tokenizer | None:
    from megaslm.export import find_tokenizer

    tok = find_tokenizer(run_dir)
    return load_tokenizer(tok) if tok else None


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_scorer(spec: str, device: torch.device | None = None, tag: str | None = None) -> Scorer:
    """The model named by `spec` (a run directory, or a Hugging Face directory), ready to score on `device`."""
    from megaslm.parallel.dist import quiet_libraries

    quiet_libraries()  # transformers' "Loading weights" bar, twice per analysis, for a fraction of a second
    device = device or pick_device()
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"model {spec} does not exist (expected a Hugging Face directory or a megaslm run directory)")
    if is_run_dir(path):
        from megaslm.export import load_run_model

        lm, _ = load_run_model(path, tag)
        tokenizer, run_dir = run_tokenizer(path), path
    elif (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        has_tok = (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file()
        tokenizer = load_tokenizer(str(path)) if has_tok else None
        run_dir = _export_origin(path)
    else:
        raise UserError(f"model {spec} is neither a Hugging Face directory (config.json) nor a megaslm run "
                        "directory (config.yaml + checkpoints/)")
    lm = lm.to(device=device, dtype=_compute_dtype(device)).eval()
    return Scorer(spec, TokenLossModel(lm), tokenizer, int(lm.config.vocab_size), run_dir, device)


def _export_origin(hf_dir: Path) -> Path | None:
    info = hf_dir / "megaslm_export.json"
    if not info.is_file():
        return None
    run = Path(json.loads(info.read_text()).get("run_dir") or "")
    return run if is_run_dir(run) else None


def check_same_tokenizer(model: Scorer, reference: Scorer) -> None:
    """The reference must score the same token ids: same vocabulary, and the same tokenizer when both are known."""
    if model.vocab_size != reference.vocab_size:
        raise UserError(f"--model {model.spec} has vocab_size {model.vocab_size} but --reference {reference.spec} "
                        f"has {reference.vocab_size}: the two models must share the tokenizer")
    a, b = model.tokenizer, reference.tokenizer
    if a is not None and b is not None and a.fingerprint != b.fingerprint:
        raise UserError(f"--model {model.spec} has tokenizer sha256 {a.fingerprint[:12]} but --reference "
                        f"{reference.spec} has {b.fingerprint[:12]}: the two models must share the tokenizer")


def _batch(windows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids / labels; padding takes no loss and, under causal attention, changes nothing
    before it."""
    width = max(len(w) for w in windows) - 1
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(windows):
        t = torch.as_tensor(np.asarray(w, dtype=np.int64))
        ids[i, :len(w) - 1] = t[:-1]
        labels[i, :len(w) - 1] = t[1:]
    return ids, labels


@torch.inference_mode()
def score_windows(scorer: Scorer, windows: list[np.ndarray], batch_size: int = 8, pad_id: int = 0,
                  desc: str = "scoring") -> list[np.ndarray]:
    """Per-token losses (float32, len(w) - 1 each) of every window, in order; a progress bar on long inputs."""
    from tqdm import tqdm

    out: list[np.ndarray] = []
    starts = range(0, len(windows), batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", file=sys.stderr, disable=len(starts) < 8, leave=False)
    for s in bar:
        chunk = windows[s:s + batch_size]
        ids, labels = _batch(chunk, pad_id)
        losses = scorer.model(ids.to(scorer.device), labels.to(scorer.device)).float().cpu().numpy()
        out += [losses[i, :len(w) - 1].copy() for i, w in enumerate(chunk)]
    return out


def release(scorer: Scorer) -> None:
    """Free the model's memory (dynamics loads one checkpoint after the other)."""
    scorer.model = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
