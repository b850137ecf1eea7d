"""Checkpoints: DeepSpeed's sharded save plus our own per-rank RNG states and a commit pointer.

`checkpoints/latest_complete` names the newest tag whose every rank finished writing; it is replaced atomically
(temp file + rename) only after a barrier, so a crash while saving leaves the previous good checkpoint in force.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megaslm.atomic import write_text
from megaslm.train.faults import maybe_fail

POINTER = "latest_complete"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_root: Path) -> str | None:
    p = Path(ckpt_root) / POINTER
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if (Path(ckpt_root) / tag).is_dir() else None


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int) -> str:
    ckpt_root = Path(ckpt_root)
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_root / tag / f"rng_rank{rank:05d}.pt")
    maybe_fail("crash_in_save", step)
    dist.barrier()
    if rank == 0:
        write_text(ckpt_root / POINTER, tag)
        _prune(ckpt_root, keep, tag)
    dist.barrier()
    return tag


def list_tags(ckpt_root: Path) -> list[str]:
    """Checkpoint tags present on disk, oldest first (complete ones are those <= the `latest_complete` tag)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and re.fullmatch(r"step_\d{8}", d.name))


def _prune(ckpt_root: Path, keep: int, current: str) -> None:
    """Keep the newest `keep` checkpoints; keep == 0 keeps all of them (for `megaslm analyze dynamics`)."""
    tags = list_tags(ckpt_root)
    older = [t for t in tags if t < current] if keep > 0 else []
    for t in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(ckpt_root / t, ignore_errors=True)
    for t in tags:  # a tag newer than the committed one is a crashed save: it is garbage
        if t > current:
            shutil.rmtree(ckpt_root / t, ignore_errors=True)


def load(engine, ckpt_root: Path) -> dict | None:
    """Load the latest complete checkpoint into the engine; returns its client state, or None if there is none."""
    tag = latest_tag(ckpt_root)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_root) / tag}")
    rng_file = Path(ckpt_root) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    client_state["tag"] = tag
    return client_state
