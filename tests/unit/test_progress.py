"""monitor.Progress: elapsed time and an ETA from the recent pace, against a clock the test drives."""

import pytest

from megaslm.monitor import Progress, hms


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def simulate(step_s, total=200, log_every=5, eval_every=20, eval_s=4.0, warmup_s=30.0, slow_from=None):
    """Drive a Progress as the trainer's Monitor does; return {step: (elapsed, eta)} and the actual end time."""
    clock = Clock()
    p = Progress(total, 0, window=max(eval_every, 4 * log_every), clock=clock)
    out = {}
    for step in range(1, total + 1):
        clock.t += step_s * (3 if slow_from and step > slow_from else 1) + (warmup_s if step == 1 else 0)
        if step % eval_every == 0:
            clock.t += eval_s
        if step % log_every == 0:
            out[step] = p.update(step)
    return out, clock.t - 100.0


def test_eta_halfway_is_within_a_quarter_of_the_actual_rest():
    out, end = simulate(step_s=0.5)
    elapsed, eta = out[100]
    rest = end - elapsed
    assert rest == pytest.approx(100 * 0.5 + 5 * 4.0)  # the independent count: 100 steps and 5 evaluations left
    assert abs(eta - rest) <= 0.25 * rest
    assert eta == pytest.approx(rest, rel=0.02)  # steady pace: the window covers whole eval periods
    assert out[200] == (pytest.approx(end), 0.0)


def test_start_up_time_does_not_inflate_a_later_eta():
    out, end = simulate(step_s=0.5, warmup_s=120.0)
    elapsed, eta = out[100]
    assert eta == pytest.approx(end - elapsed, rel=0.02)  # the 120 s of the first step are out of the window
    assert elapsed > 120


def test_eta_follows_a_change_of_pace_within_one_window():
    out, end = simulate(step_s=0.5, slow_from=100)
    elapsed, eta = out[140]  # 40 slow steps later: the window (20 steps) holds only the new pace
    assert eta == pytest.approx(end - elapsed, rel=0.05)


def test_resumed_run_counts_from_its_start_step_and_hms_formats():
    clock = Clock()
    p = Progress(100, start=60, window=10, clock=clock)
    clock.t += 40.0
    elapsed, eta = p.update(80)  # 20 steps in 40 s: 20 left take 40 s
    assert (elapsed, eta) == (40.0, 40.0)
    assert p.text(100) == "elapsed 00:00:40 | eta 00:00:00"
    assert hms(3725.4) == "01:02:05" and hms(-3) == "00:00:00"
