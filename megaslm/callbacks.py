"""Hooks for side concerns of the training loop (OLMo-core's callbacks, cut down to what megaslm needs), and the
registry of the stateful parts whose state goes into every checkpoint (torchtitan's `states`).

A callback sees the trainer at a few fixed points of every optimizer step. It lives here, below every package,
so that train/, reference/ (the EMA reference) and analyze/ (the token view) all import it downward.
Parts that change the state of a run (an EMA reference, a loss-spike detector) set `name` and implement
`state_dict` / `load_state_dict`: the trainer registers them in its `StateRegistry`, which saves their state in
every checkpoint under that name and restores it on resume, so resuming stays exact as such parts appear.
Callbacks run in list order, on every rank.
"""

from __future__ import annotations

from typing import Protocol


class Callback:
    name: str | None = None  # set by stateful callbacks: the key of their state in checkpoints

    def on_train_start(self, trainer) -> None:
        """Once, after the engines are built and a checkpoint (if any) has been loaded."""

    def pre_step(self, trainer) -> None:
        """Before the micro-steps of optimizer step `trainer.step + 1`."""

    def on_forward(self, trainer, tensors: dict) -> None:
        """Each micro-step, after the forward: `tensors` holds token_loss [B, T] (and the head's extra outputs);
        a callback may replace them (fault injection) before the objective sees them."""

    def pre_optimizer(self, trainer, stats: dict) -> None:
        """Each micro-step, with the objective's metrics, before its backward and the (boundary) optimizer step."""

    def post_step(self, trainer, rec: dict) -> None:
        """After the optimizer step (trainer.step is the step just taken), before logging; may add to `rec`."""

    def on_train_end(self, trainer) -> None:
        """Once, when the loop ends (finished or stopped by a signal), before the monitor closes."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class Stateful(Protocol):
    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict) -> None: ...


class StateRegistry:
    """Named stateful parts of a run (the loader, stateful callbacks) and their one checkpoint client state:
    {"<name>": state, ..., "callbacks": {"<callback name>": state}} (the layout checkpoints have always had)."""

    def __init__(self):
        self.parts: dict[tuple[str, ...], Stateful] = {}

    def register(self, name: str, part: Stateful, *, callback: bool = False) -> None:
        key = ("callbacks", name) if callback else (name,)
        if key in self.parts:
            raise ValueError(f"two parts share the state name {name!r}")
        self.parts[key] = part

    def register_callbacks(self, callbacks: list[Callback]) -> None:
        for cb in callbacks:
            if cb.name:
                self.register(cb.name, cb, callback=True)

    def state_dict(self) -> dict:
        out: dict = {"callbacks": {}}
        for key, part in self.parts.items():
            (out["callbacks"] if len(key) == 2 else out)[key[-1]] = part.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore each part whose name is in `state` (a checkpoint from before a part existed has none)."""
        for key, part in self.parts.items():
            node = (state.get("callbacks") or {}) if len(key) == 2 else state
            if node.get(key[-1]) is not None:
                part.load_state_dict(node[key[-1]])
