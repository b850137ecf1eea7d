"""Every process's random states in a checkpoint (`rng_rankNNNNN.pt`), and their re-derivation when a resume
changes the number of ranks."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers only: the file loads with torch.load(weights_only=True),
    so a run directory's rng files cannot carry code (a pickle would run it as the user who resumes)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"format": 2, "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                                    "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    py, npy = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_rng(rng_file: Path) -> bool:
    """Restore this rank's RNG states from `rng_file` with weights_only=True; False (nothing restored) for a
    file of the earlier pickled format, which is not unpickled."""
    try:
        state = torch.load(rng_file, weights_only=True)
    except pickle.UnpicklingError:
        return False
    set_rng_state(state)
    return True


def rng_for_rank(seed: int, step: int, rank: int) -> dict:
    """The RNG states of `rank` after a resume on another layout: each stream seeded from (seed, step, rank), so
    the same resume gives the same streams. (The data order does not use them: it is a seeded permutation.)"""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]) % (2**63)
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)
    state = rng_state()
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    return state
