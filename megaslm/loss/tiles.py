"""The tile arithmetic both loss heads share (per_token_ce.py's recompute path, fused_ce.py's fused one): one
[token chunk, vocabulary block] tile of logits, the targets that fall in a block, and the weight gradient
accumulated block by block. Its own module so that neither head imports the other's internals."""

from __future__ import annotations

import torch


def chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Matmul in the weight's dtype (as nn.Linear would), softmax statistics in fp32.
    return (h.to(weight.dtype) @ weight.t()).float()


def local_targets(labels: torch.Tensor, valid: torch.Tensor, vocab_start: int, local_rows: int):
    """(column of the label in this shard, mask of tokens whose label lives in this shard)."""
    col = labels - vocab_start
    here = valid & (col >= 0) & (col < local_rows)
    return torch.where(here, col, torch.zeros_like(col)), here


class WeightGrad:
    """The weight gradient, one vocabulary block at a time. With one token chunk each block is written once, in
    the weight's dtype; with several, blocks are summed over the chunks in fp32."""

    def __init__(self, weight, several_chunks: bool):
        self.weight = weight
        acc_dtype = torch.float32 if several_chunks else weight.dtype
        self.grad = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)

    def add(self, v: int, d_t: torch.Tensor, h: torch.Tensor) -> None:
        rows = self.grad[v:v + d_t.shape[0]]
        if rows.dtype == d_t.dtype:
            rows.addmm_(d_t, h)
        else:
            rows += d_t @ h

    def result(self) -> torch.Tensor:
        return self.grad.to(self.weight.dtype)
