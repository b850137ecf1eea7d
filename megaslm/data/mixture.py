"""Weighted mixtures of shard sets: one training stream drawn from several corpora by weight.

Each component keeps its own order: epoch e of component c visits its sequences (packed as in
`megaslm.data.loader`) in `np.random.default_rng([seed, c, e]).permutation(n_seq_c)`; when it runs out, its next
epoch starts (other components are unaffected) and its epoch count goes up.

Which component each sequence comes from: the stream is a sequence of slots; slot m goes to the component
with the largest deficit `(m + 1) * w_c - drawn_c` (w_c = weight / sum of weights; ties to the lower index).
So after any number of slots every component's count is within one sequence of its exact share (the
unit test measures the bound), every global micro-batch of G slots holds each component's G * w_c sequences
as closely as integer counts allow, and the assignment does not depend on the seed (the seed picks which
sequences). Each `next_batch()` takes the next G = micro_batch_size * dp_size slots; rank r takes slots
[r * B, (r + 1) * B), so ranks see disjoint sequences and dp_size = 2, B = 4 sees exactly dp_size = 1, B = 8.

Batches are the loader's dict (`input_ids`, `labels`, `index` = the sequence number within its component,
`position_ids` with document masking) plus `component` [B] and `source` [B, T]: the component index of every
token, or with `track_sources` a flat index over (component, input file) pairs; `source_names` names them
("web" or "web/0", "web/1", ...). The state is the slot count, per-component counts and (epoch, pos), all
counted in slots of the global stream: resuming is exact under any layout, and another step batch (micro_batch_size
x dp_size x grad_accum) goes on from the same slot (`step_batch_change`, as the loader's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megaslm.data.loader import PackedLoader, saved_step_batch
from megaslm.data.shards import ShardSet
from megaslm.errors import UserError


@dataclass
class Component:
    name: str
    shards: ShardSet
    weight: float


class MixtureLoader:
    def __init__(self, components: list[Component], seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, track_sources: bool = False, document_mask: bool = False,
                 grad_accum: int = 1):
        if not components:
            raise UserError("a mixture needs at least one component")
        if not 0 <= int(dp_rank) < int(dp_size):
            raise UserError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.components = list(components)
        total = sum(float(c.weight) for c in components)
        if not all(c.weight > 0 for c in components):
            raise UserError("mixture weights must be > 0: " + ", ".join(f"{c.name}={c.weight}" for c in components))
        self.weights = [float(c.weight) / total for c in components]
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.global_batch_size = self.micro_batch_size * self.dp_size
        self.step_sequences = self.global_batch_size * max(1, int(grad_accum))
        self.step_batch_change: tuple[int, int] | None = None
        self.track_sources = bool(track_sources)
        self.loaders = [PackedLoader(c.shards, seq_len, 1, eval_only=True, with_source=track_sources,
                                     document_mask=document_mask) for c in components]
        for c, ld in zip(components, self.loaders):
            if ld.n_seq < 1:
                raise UserError(f"mixture component {c.name} ({c.shards.path}) holds {c.shards.num_tokens} tokens: "
                                f"not one sequence of seq_len {seq_len}")
        self.source_names, self._offsets = [], []
        for c in components:
            self._offsets.append(len(self.source_names))
            n = len(c.shards.sources) if track_sources else 0
            self.source_names += [f"{c.name}/{i}" for i in range(n)] if n else [c.name]
        self.slots = 0
        self.drawn = [0] * len(components)
        self.epochs = [0] * len(components)
        self.pos = [0] * len(components)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def epoch(self) -> int:
        """Epochs every component has completed (the smallest count); `epochs` has each one's."""
        return min(self.epochs)

    def _perm(self, c: int) -> np.ndarray:
        e = self.epochs[c]
        if c not in self._perms or self._perms[c][0] != e:
            self._perms[c] = (e, np.random.default_rng([self.seed, c, e]).permutation(self.loaders[c].n_seq))
        return self._perms[c][1]

    def _next_slot(self) -> tuple[int, int]:
        """(component, sequence number) of the next slot of the stream; advances the state."""
        m = self.slots + 1
        c = max(range(len(self.weights)), key=lambda i: (m * self.weights[i] - self.drawn[i], -i))
        if self.pos[c] >= self.loaders[c].n_seq:  # this component ran out: its next epoch
            self.epochs[c] += 1
            self.pos[c] = 0
        seq = int(self._perm(c)[self.pos[c]])
        self.pos[c] += 1
        self.drawn[c] += 1
        self.slots = m
        return c, seq

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's part of the next global micro-batch (see the module docstring)."""
        B = self.micro_batch_size
        slots = [self._next_slot() for _ in range(self.global_batch_size)]
        mine = slots[self.dp_rank * B:(self.dp_rank + 1) * B]
        comp = np.array([c for c, _ in mine], np.int64)
        out: dict[str, torch.Tensor] | None = None
        for c in np.unique(comp):
            rows = np.nonzero(comp == c)[0]
            part = self.loaders[c].rows(np.array([mine[k][1] for k in rows]), len(rows))
            src = part.pop("source", None)
            part["source"] = (src + self._offsets[c]) if src is not None else torch.full_like(part["labels"], c)
            if out is None:
                out = {k: torch.empty((B, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
            for k, v in part.items():
                out[k][torch.from_numpy(rows)] = v
        out["component"] = torch.from_numpy(comp)
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"kind": "mixture", "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "step_sequences": self.step_sequences,
                "slots": self.slots,
                "components": [{"name": c.name, "weight": w, "drawn": d, "epoch": e, "pos": p,
                                "num_tokens": c.shards.num_tokens, "num_documents": c.shards.num_documents,
                                "fingerprint": c.shards.fingerprint, "shards": c.shards.path,
                                "shard_hashes": c.shards.shard_hashes}
                               for c, w, d, e, p in zip(self.components, self.weights, self.drawn, self.epochs,
                                                        self.pos)]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped; a UserError names what differs."""
        if state.get("kind") != "mixture":
            raise UserError("cannot resume the data loader: the checkpoint was written for one shard directory "
                            "(data.train), this run reads a mixture")
        mine = self.state_dict()
        diffs = [f"{k} {state.get(k)} in the saved state vs {mine[k]} now"
                 for k in ("seed", "seq_len") if state.get(k) != mine[k]]
        saved = [(c["name"], c["weight"], c["num_tokens"], c["num_documents"], c["fingerprint"])
                 for c in state.get("components", [])]
        now = [(c["name"], c["weight"], c["num_tokens"], c["num_documents"], c["fingerprint"])
               for c in mine["components"]]
        if saved != now:
            diffs.append(f"components (name, weight, tokens, documents, tokenizer) {saved} in the saved state vs "
                         f"{now} now")
        if diffs:
            raise UserError("cannot resume the data loader: " + "; ".join(diffs))
        for comp, saved_comp in zip(self.components, state["components"]):
            changed = comp.shards.changed_shard(saved_comp.get("shard_hashes"))
            if changed:
                raise UserError(f"cannot resume the data loader: component {comp.name}: {changed}")
        self.slots = int(state["slots"])
        for i, c in enumerate(state["components"]):
            self.drawn[i], self.epochs[i], self.pos[i] = int(c["drawn"]), int(c["epoch"]), int(c["pos"])
        self.step_batch_change = saved_step_batch(state, self.step_sequences, self.global_batch_size)
