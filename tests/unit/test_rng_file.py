"""A checkpoint's rng_rank*.pt holds tensors and numbers only, loaded with weights_only=True (no pickle)."""

from __future__ import annotations

import random

import numpy as np
import torch

from megaslm.train.rng import load_rng, rng_state


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian in numpy's state
    f = tmp_path / "rng_rank00000.pt"
    torch.save(rng_state(), f)
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng(f) and draws() == expected
    torch.load(f, weights_only=True)  # no object but tensors and plain containers


def test_a_pickled_rng_file_is_not_unpickled(tmp_path):
    f = tmp_path / "rng_rank00000.pt"
    torch.save({"numpy": np.random.get_state()}, f)  # the earlier format: numpy arrays, a pickle
    random.seed(5)
    before = random.getstate()
    assert load_rng(f) is False and random.getstate() == before
