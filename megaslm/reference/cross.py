"""A reference model with another tokenizer than the trained model's (docs/score.md).

`tokenizer_pair(path, shards, trained_tokenizer)` decides: None when the reference at `path` scores the shards'
own token ids (same tokenizer, or a model directory without tokenizer files and the same vocabulary: today's
path, unchanged); else a `CrossTokenizer` (xtok.py) that turns windows into the reference's tokens and carries
its losses back by bytes. `CrossTokenizerReference` wraps an online reference model with it: every batch is
decoded to bytes, tokenized by the reference's tokenizer, scored, and carried back onto the batch's labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megaslm.errors import UserError


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer.model").exists() or (Path(path) / "tokenizer.json").exists()


def tokenizer_pair(path: str, shards, trained_tokenizer: str | None, *, vocab_size: int | None = None,
                   key: str = "reference.path"):
    """None for a reference of the shards' tokenizer; a CrossTokenizer for one of another tokenizer (needs the
    shards' tokenizer, `data.tokenizer`, to decode the windows). UserError naming the keys otherwise."""
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.build import load_hf_config

    vocab, want = load_hf_config(path).vocab_size, vocab_size or shards.vocab_size
    if not _has_tokenizer(path):
        if vocab != want:
            raise UserError(f"{key} {path} has vocab_size {vocab} but the training shards {shards.path} have "
                            f"vocab_size {want}: the reference must share the tokenizer, or its "
                            "directory must hold its own tokenizer (tokenizer.json / tokenizer.model) to be aligned "
                            "by bytes")
        return None
    ref_tok = load_tokenizer(path)
    if ref_tok.fingerprint == shards.fingerprint:
        if vocab != want:
            raise UserError(f"{key} {path} has vocab_size {vocab} but the training shards {shards.path} have "
                            f"vocab_size {want}: the reference must share the tokenizer")
        return None
    where = (f"{key} {path} has tokenizer sha256 {ref_tok.fingerprint[:12]} but the training shards {shards.path} "
             f"were tokenized with sha256 {shards.fingerprint[:12]}")
    if not trained_tokenizer:
        raise UserError(f"{where}: to use a reference with another tokenizer (its losses carried over by bytes), "
                        "set data.tokenizer to the shards' tokenizer")
    if vocab < ref_tok.vocab_size:
        raise UserError(f"{where}, and its model has vocab_size {vocab} but its tokenizer {ref_tok.vocab_size} "
                        "tokens: not a model of that tokenizer")
    trained = load_tokenizer(trained_tokenizer)
    if trained.fingerprint != shards.fingerprint:
        raise UserError(f"{where}, and data.tokenizer {trained_tokenizer} (sha256 {trained.fingerprint[:12]}) is not "
                        "the shards' tokenizer either: set data.tokenizer to the tokenizer the shards were prepared "
                        "with")
    from megaslm.reference.xtok import CrossTokenizer

    return CrossTokenizer(trained, ref_tok)


def reference_rows(ref_ids: list, limit: int | None) -> list:
    """A window's reference tokens as rows the reference can take: whole, or, longer than its `limit` positions
    (a reference tokenizer finer than the trained one), cut into blocks of `limit` tokens that overlap by one, as
    `megaslm score` cuts documents (score_docs.blocks): each block's context restarts at its start."""
    if not limit or len(ref_ids) <= limit:
        return [ref_ids]
    from megaslm.reference.score_docs import blocks

    return [blk for _, blk in blocks(list(ref_ids), limit - 1)]


def reference_inputs(rows, device):
    """The reference's [B, L] input ids and labels (-100 past each row's end); L: the longest row, less one."""
    L = max(2, max(len(r) for r in rows))
    ids = np.zeros((len(rows), L), np.int64)
    labels = np.full((len(rows), L - 1), -100, np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        labels[r, :len(row) - 1] = row[1:]
    return torch.from_numpy(ids[:, :-1]).to(device), torch.from_numpy(labels).to(device)


class CrossTokenizerReference:
    """`losses_for(batch)`: the reference (an OnlineReference) run on the batch's windows in its own
    tokenization, its losses carried onto the batch's labels (0 where labels == -100 and on padding rows)."""

    def __init__(self, model, pair):
        self.model, self.pair = model, pair
        self.placement = f"{model.placement}, another tokenizer"
        self.description = getattr(model, "description", None)

    def forward_flops_per_token(self, seq_len: int) -> float:
        return self.model.forward_flops_per_token(seq_len)  # per reference token; about one per trained token

    @torch.no_grad()
    def losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = input_ids.detach().cpu().numpy()
        lab = labels.detach().cpu().numpy()
        last = np.where(lab[:, -1] >= 0, lab[:, -1], self.pair.trained.tokenizer.eos_id)
        windows = list(np.concatenate([ids, last[:, None]], axis=1))
        plans = self.pair.plan(windows)
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        rows = [reference_rows(p.ref_ids, limit) for p in plans]
        r_ids, r_labels = reference_inputs([row for rs in rows for row in rs], input_ids.device)
        r_pos = None
        if position_ids is not None:  # document masking: the reference's positions restart after its EOS
            from megaslm.data.loader import document_positions

            r_pos = torch.from_numpy(document_positions(r_ids.cpu().numpy(), self.pair.ref_eos)).to(input_ids.device)
        v = self.model.losses(r_ids, r_labels, r_pos).float().cpu().numpy()
        out = np.zeros(lab.shape, np.float32)
        at = 0
        for r, p in enumerate(plans):
            parts = [v[at + k, :len(row) - 1] for k, row in enumerate(rows[r])]
            at += len(rows[r])
            ref = np.concatenate([[0.0], *parts])
            out[r] = self.pair.carry(p, ref, len(windows[r]))[1:]
        out[lab == -100] = 0.0
        return torch.from_numpy(out).to(labels.device)

    def losses_for(self, batch: dict) -> torch.Tensor:
        return self.losses(batch["input_ids"], batch["labels"], batch.get("position_ids"))
