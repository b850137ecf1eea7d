"""Packed, shuffled, data-parallel, resumable batches from a shard set.

Packing: the token stream (documents with EOS between them) is cut into n_seq = (num_tokens - 1) // seq_len
sequences; sequence i is the window tokens[i*seq_len : i*seq_len + seq_len + 1] (consecutive windows share
one token), input_ids = window[:-1], labels = window[1:]. Documents are not aligned to windows and
attention is not masked at EOS (nanoGPT / GPT-NeoX style packing).

Order: epoch e visits the sequences in `np.random.default_rng([seed, e]).permutation(n_seq)`. Each
`next_batch()` consumes one global micro-batch of G = micro_batch_size * dp_size consecutive entries of that
order, and rank r takes entries [pos + r*B, pos + (r+1)*B). So dp_size=2, B=4 sees exactly the sequences of
dp_size=1, B=8. An optimizer step takes `grad_accum` global micro-batches, S = G * grad_accum entries; when
fewer than S entries are left at the start of a step, the epoch ends (the remainder is dropped) and the next
epoch's permutation begins, so a step never spans two epochs. The state is (epoch, pos), counted in entries
of the global order, and nothing else: resuming is exact under any layout (dp_size, micro_batch_size,
grad_accum) with the same S, and a resume under another S goes on from the same entry (`step_batch_change`
says it; the trainer reports and records it).

Batches are dicts of LongTensors: `input_ids`, `labels` [B, seq_len], `index` [B] (the sequence number i,
so token offsets are i*seq_len + 1 ... for labels; -1 for padding), and with `with_source=True`
`source` [B, seq_len]: for each label token, the index into the shard set's `sources` of its input file.

Loss masks: in shards with a loss mask (SFT), a label whose token has mask 0 is -100, so every objective, the
reference and the metrics skip it with no code of their own.

Document masking (`document_mask=True`): the batch also holds `position_ids` [B, seq_len] that restart at 0 at the
window's first token and after every EOS in input_ids; the model derives a block-diagonal causal attention
from them (transformers' packed-sequence path), so no token attends across a document boundary. The label of
an EOS input (the next document's first token, which no document-only run predicts) is -100.

`eval_batches` walks sequences 0, 1, 2, ... in order (no shuffle) with the same rank split; the last global
batch is padded to full size so every rank yields the same number of batches: padded rows have
input_ids = eos_id, labels = -100 (the usual ignore_index), source = -1, index = -1.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megaslm.data.shards import ShardSet
from megaslm.errors import UserError

IGNORE_INDEX = -100


def model_inputs(batch: dict, device) -> dict:
    """What the model takes besides input_ids and labels: position_ids under document masking."""
    return {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}


def document_positions(input_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """int64 [B, T]: each token's offset since the row start or the last EOS before it (a document starts after
    every EOS)."""
    B, T = input_ids.shape
    starts = np.zeros((B, T), bool)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    idx = np.broadcast_to(np.arange(T), (B, T))
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int64)


class PackedLoader:
    """See the module docstring. `eval_only=True` skips the check that the set holds at least one global
    micro-batch (needed by `next_batch`, not by `eval_batches`, which pads)."""

    def __init__(self, shards: ShardSet | str, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, with_source: bool = False, eval_only: bool = False,
                 document_mask: bool = False, grad_accum: int = 1):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        if int(seq_len) < 1 or int(micro_batch_size) < 1:
            raise UserError(f"seq_len and micro_batch_size must be >= 1, got {seq_len} and {micro_batch_size}")
        if not 0 <= int(dp_rank) < int(dp_size):
            raise UserError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.seq_len = int(seq_len)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed = int(seed)
        self.with_source = bool(with_source)
        self.document_mask = bool(document_mask)
        self.global_batch_size = self.micro_batch_size * self.dp_size
        self.grad_accum = max(1, int(grad_accum))
        self.step_sequences = self.global_batch_size * self.grad_accum
        self.n_seq = max(0, (self.shards.num_tokens - 1) // self.seq_len)
        if not eval_only and self.n_seq < self.step_sequences:
            need = self.step_sequences * self.seq_len + 1
            raise UserError(
                f"shards {self.shards.path} hold {self.shards.num_tokens} tokens ({self.n_seq} sequences of "
                f"{self.seq_len}), but one optimizer step ({self.micro_batch_size} x {self.dp_size} ranks x "
                f"{self.grad_accum} micro-steps x seq_len {self.seq_len}) needs {need} tokens")
        self.epoch = 0
        self.pos = 0
        self._micro = 0  # global micro-batches drawn since the launch: a step starts every grad_accum of them
        self.step_batch_change: tuple[int, int] | None = None  # (saved S, this S) after such a resume
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.n_seq // self.step_sequences

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_seq)
            self._perm_epoch = epoch
        return self._perm

    def rows(self, seqs: np.ndarray, rows: int) -> dict[str, torch.Tensor]:
        """Rows for sequence numbers `seqs`, padded to `rows` rows."""
        L = self.seq_len
        window = np.full((rows, L + 1), self.shards.eos_id, np.int64)
        index = np.full(rows, -1, np.int64)
        source = np.full((rows, L), -1, np.int64) if self.with_source else None
        for k, s in enumerate(seqs):
            s = int(s)
            window[k] = self.shards.read(s * L, s * L + L + 1)
            index[k] = s
            if source is not None:
                source[k] = self.shards.source_of_tokens(s * L + 1, s * L + L + 1)
        labels = window[:, 1:].copy()
        labels[len(seqs):] = IGNORE_INDEX
        if self.shards.has_loss_mask:
            for k, s in enumerate(seqs):
                labels[k][~self.shards.read_loss_mask(int(s) * L + 1, int(s) * L + L + 1)] = IGNORE_INDEX
        input_ids = np.ascontiguousarray(window[:, :-1])
        out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
               "index": torch.from_numpy(index)}
        if self.document_mask:
            out["position_ids"] = torch.from_numpy(document_positions(input_ids, self.shards.eos_id))
            labels[input_ids == self.shards.eos_id] = IGNORE_INDEX
        if source is not None:
            out["source"] = torch.from_numpy(source)
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's part of the next global micro-batch (see the module docstring)."""
        G, B = self.global_batch_size, self.micro_batch_size
        if self.n_seq < self.step_sequences:
            raise UserError(f"shards {self.shards.path} hold {self.n_seq} sequences of {self.seq_len} tokens, "
                            f"fewer than one optimizer step ({self.step_sequences})")
        if self._micro % self.grad_accum == 0 and self.pos + self.step_sequences > self.n_seq:
            self.epoch += 1
            self.pos = 0
        self._micro += 1
        perm = self._permutation(self.epoch)
        start = self.pos + self.dp_rank * B
        seqs = perm[start:start + B]
        self.pos += G
        return self.rows(seqs, B)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def eval_batches(self, max_sequences: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Sequences 0 .. min(n_seq, max_sequences)-1 in order, in global micro-batches split over ranks as
        in training; the last one padded (labels -100). Does not touch the training position."""
        m = self.n_seq if max_sequences is None else max(0, min(self.n_seq, int(max_sequences)))
        G, B = self.global_batch_size, self.micro_batch_size
        for g in range(0, m, G):
            lo = min(m, g + self.dp_rank * B)
            hi = min(m, lo + B)
            yield self.rows(np.arange(lo, hi), B)

    def num_eval_batches(self, max_sequences: int | None = None) -> int:
        m = self.n_seq if max_sequences is None else max(0, min(self.n_seq, int(max_sequences)))
        return -(-m // self.global_batch_size)

    def state_dict(self) -> dict:
        """Position plus what it is only meaningful for (checked by `load_state_dict`)."""
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "step_sequences": self.step_sequences,
                "num_tokens": self.shards.num_tokens,
                "num_documents": self.shards.num_documents, "fingerprint": self.shards.fingerprint,
                "shards": self.shards.path, "shard_hashes": self.shards.shard_hashes}

    def load_state_dict(self, state: dict) -> None:
        """Continue from the saved position. Raises UserError if the state belongs to another seed / seq_len /
        shard set; another step batch is allowed (`step_batch_change`)."""
        if state.get("kind") == "mixture":
            raise UserError("cannot resume the data loader: the checkpoint was written for a mixture (data.train a "
                            f"list), this run reads one shard directory {self.shards.path}")
        mine = self.state_dict()
        diffs = []
        for key in ("seed", "seq_len", "num_tokens", "num_documents", "fingerprint"):
            if key not in state:
                raise UserError(f"loader state has no {key!r}; not a PackedLoader state")
            if state[key] != mine[key]:
                diffs.append(f"{key} {state[key]} in the saved state vs {mine[key]} now")
        if diffs:
            where = f" (saved for shards {state.get('shards')}, now {self.shards.path})"
            raise UserError("cannot resume the data loader: " + "; ".join(diffs) + where)
        changed = self.shards.changed_shard(state.get("shard_hashes"))
        if changed:  # same counts, other data (e.g. the same documents prepared in another order)
            raise UserError(f"cannot resume the data loader: {changed}; resume on the data the run started on, or "
                            f"start over (train.resume_from=none) or in a new run.dir")
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos <= self.n_seq:
            raise UserError(f"loader state has an invalid position (epoch {epoch}, pos {pos}, n_seq {self.n_seq})")
        self.epoch, self.pos = epoch, pos
        self.step_batch_change = saved_step_batch(state, self.step_sequences, self.global_batch_size)


def saved_step_batch(state: dict, step_sequences: int, global_batch: int) -> tuple[int, int] | None:
    """(the saved state's sequences per optimizer step, this one's) when they differ, else None. A state saved
    before megaslm recorded the step's sequences only has its global micro-batch: that is compared instead."""
    if "step_sequences" in state:
        then, now = int(state["step_sequences"]), step_sequences
    else:
        then, now = int(state.get("global_batch_size", global_batch)), global_batch
    return None if then == now else (then, now)
