"""The skip guard's decision rule and saved state, and the config keys that drive it (no engine needed)."""

from __future__ import annotations

import math
import statistics

import pytest

from megaslm.config import from_dict
from megaslm.errors import UserError
from megaslm.train.guard import SkipGuard


def _judge(guard, micro_losses, grad_norm=1.0):
    guard.pre_step(None)
    for loss, n in micro_losses:
        guard.observe({"loss": loss, "n_valid": n})
    return guard._judge(grad_norm)


def test_non_finite_loss_or_norm_is_skipped():
    g = SkipGuard(3)
    assert _judge(g, [(2.0, 10)]) is None
    assert "loss is nan" in _judge(g, [(2.0, 10), (math.nan, 10)])
    assert "gradient norm is inf" in _judge(g, [(2.0, 10)], grad_norm=math.inf)


def test_spike_rule_matches_mean_plus_k_sample_std():
    g = SkipGuard(3, spike_sigma=2.0, window=8)
    g.window = [3.0, 3.2, 2.9, 3.1]  # half of the window: judged from here on
    mean, std = statistics.mean(g.window), statistics.stdev(g.window)
    below, above = mean + 2.0 * std - 1e-6, mean + 2.0 * std + 1e-6
    assert _judge(g, [(below, 5)]) is None
    assert "loss spike" in _judge(g, [(above, 5)])
    # The step loss is the token-weighted mean of the micro-steps.
    assert g.step_loss() == above
    _judge(g, [(above, 1), (mean, 3)])
    assert g.step_loss() == pytest.approx((above + 3 * mean) / 4)
    g.window = [3.0, 3.2, 2.9]  # under half full: not judged
    assert _judge(g, [(100.0, 5)]) is None


def test_state_round_trip_and_window_bound():
    g = SkipGuard(3, spike_sigma=2.0, window=4)
    g.window, g.skipped, g.consecutive = [1.0, 2.0, 3.0, 4.0], 5, 2
    h = SkipGuard(3, spike_sigma=2.0, window=4)
    h.load_state_dict(g.state_dict())
    assert (h.window, h.skipped, h.consecutive) == ([1.0, 2.0, 3.0, 4.0], 5, 2)


@pytest.mark.parametrize("key, value, match", [
    ("resume_from", "step_3", "train.resume_from"),
    ("max_skipped_steps", 0, "train.max_skipped_steps"),
    ("spike_skip_sigma", 0.0, "train.spike_skip_sigma"),
    ("spike_window", 2, "train.spike_window"),
    ("profile_steps", [5, 2], "train.profile_steps"),
    ("profile_steps", [3], "train.profile_steps"),
])
def test_bad_resilience_keys_are_user_errors(key, value, match):
    with pytest.raises(UserError, match=match):
        from_dict({"run": {"dir": "r"}, "data": {"train": "t"}, "train": {key: value}})


def test_good_resilience_keys():
    cfg = from_dict({"run": {"dir": "r"}, "data": {"train": "t"},
                     "train": {"resume_from": "step_00000300", "spike_skip_sigma": 6, "profile_steps": [2, 4]}})
    assert cfg.train.resume_from == "step_00000300" and cfg.train.spike_skip_sigma == 6.0
    assert cfg.train.profile_steps == [2, 4] and cfg.train.max_skipped_steps == 10
