"""Hooks for side concerns of the training loop (OLMo-core's callbacks, cut down to what megaslm needs).

A callback sees the trainer at a few fixed points of every optimizer step. Parts that change the state of a run
(an EMA reference, a ratio schedule, a loss-spike detector) set `name` and implement `state_dict` /
`load_state_dict`: the trainer saves their state in every checkpoint under that name and restores it on resume,
so resuming stays exact as such parts appear. Callbacks run in list order, on every rank.
"""

from __future__ import annotations


class Callback:
    name: str | None = None  # set by stateful callbacks: the key of their state in checkpoints

    def on_train_start(self, trainer) -> None:
        """Once, after the engines are built and a checkpoint (if any) has been loaded."""

    def pre_step(self, trainer) -> None:
        """Before the micro-steps of optimizer step `trainer.step + 1`."""

    def post_step(self, trainer, rec: dict) -> None:
        """After the optimizer step (trainer.step is the step just taken), before logging; may add to `rec`."""

    def on_train_end(self, trainer) -> None:
        """Once, when the loop ends (finished or stopped by a signal), before the monitor closes."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


def callback_states(callbacks: list[Callback]) -> dict:
    """{name: state} of the stateful callbacks, for the checkpoint's client state."""
    out = {}
    for cb in callbacks:
        if cb.name:
            if cb.name in out:
                raise ValueError(f"two callbacks share the state name {cb.name!r}")
            out[cb.name] = cb.state_dict()
    return out


def load_callback_states(callbacks: list[Callback], states: dict | None) -> None:
    """Restore each stateful callback whose name is in `states` (a checkpoint from before it existed has none)."""
    for cb in callbacks:
        if cb.name and states and cb.name in states and states[cb.name] is not None:
            cb.load_state_dict(states[cb.name])
