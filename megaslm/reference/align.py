"""Carrying a reference's per-token losses from its own tokenization onto the trained model's tokens, by bytes.

Both tokenizations of a text are laid on the same UTF-8 bytes: token k of either side covers the byte span
[start_k, end_k). The rule (docs/score.md, "A reference with another tokenizer"):

- a reference token's loss (its negative log-likelihood given everything before it) is spread over the bytes it
  covers in proportion to their number: a reference token of n bytes gives loss / n to each of its bytes;
- a trained token's carried loss is the sum over its bytes. So a trained token whose bytes are exactly one
  reference token gets exactly that token's loss, and one that is a run of whole reference tokens gets the sum
  of their losses; a reference token that straddles a trained-token boundary is split between the two sides in
  proportion to the bytes on each side;
- a reference token of no bytes (SentencePiece's dummy-prefix "▁" alone, once that space is dropped because it is
  not in the text) gives its loss to a trained token of no bytes at the same place if there is one (the trained
  tokenizer's own dummy "▁"), else to the trained token that holds the byte where it stands (the last one at the
  end of the text); bytes no reference token covers carry nothing.

The carried losses therefore sum to the reference's total over the text (up to float64 rounding).
"""

from __future__ import annotations

import numpy as np


def spans_of_lengths(lengths) -> np.ndarray:
    """int64 [N, 2]: the byte spans of consecutive pieces of these byte lengths, from byte 0."""
    ends = np.cumsum(np.asarray(lengths, np.int64))
    return np.stack([ends - np.asarray(lengths, np.int64), ends], axis=1) if len(ends) else np.zeros((0, 2), np.int64)


def carry(trained: np.ndarray, ref: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """float64 [N]: each trained token's share of the reference losses (the rule in the module docstring).

    trained: int64 [N, 2] spans, contiguous (each starts where the previous ends); ref: int64 [M, 2] spans in
    ascending order, not overlapping, gaps allowed (bytes the reference did not see); losses: [M]."""
    trained = np.asarray(trained, np.int64).reshape(-1, 2)
    ref = np.asarray(ref, np.int64).reshape(-1, 2)
    losses = np.asarray(losses, np.float64).reshape(-1)
    n = len(trained)
    out = np.zeros(n, np.float64)
    if n == 0 or len(ref) == 0:
        return out
    t_start, t_end = trained[:, 0], trained[:, 1]
    width = ref[:, 1] - ref[:, 0]
    point = width == 0
    if point.any():  # zero-width tokens: all to the token holding the byte where they stand
        holder = _holder(t_start, t_end, ref[point, 0])
        np.add.at(out, holder, losses[point])
    keep = ~point
    r0, r1, rl, rw = ref[keep, 0], ref[keep, 1], losses[keep], width[keep]
    if not len(r0):
        return out
    # Elementary intervals: every boundary of either side cuts the bytes; each interval lies in one reference
    # token and one trained token, and carries loss * bytes / width of its reference token.
    cuts = np.unique(np.concatenate([t_start, t_end, r0, r1]))
    a, b = cuts[:-1], cuts[1:]
    ri = np.searchsorted(r0, a, side="right") - 1
    inside = (ri >= 0) & (a < r1[np.clip(ri, 0, None)])
    a, b, ri = a[inside], b[inside], ri[inside]
    ti = np.searchsorted(t_start, a, side="right") - 1
    ok = (ti >= 0) & (a < t_end[np.clip(ti, 0, None)])
    a, b, ri, ti = a[ok], b[ok], ri[ok], ti[ok]
    share = np.where(b - a == rw[ri], rl[ri], rl[ri] * ((b - a) / rw[ri]))  # a whole token: its loss, exactly
    out += np.bincount(ti, weights=share, minlength=n)
    return out


def _holder(t_start: np.ndarray, t_end: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Index of the trained token that takes a zero-width reference token at byte `pos`: the first zero-width
    trained token there, else the one of nonzero width holding byte pos (the last such token at or past the end)."""
    wide = np.nonzero(t_end > t_start)[0]
    if not len(wide):
        return np.zeros(len(pos), np.int64)
    k = np.searchsorted(t_start[wide], pos, side="right") - 1
    out = wide[np.clip(k, 0, len(wide) - 1)]
    point = np.nonzero(t_end == t_start)[0]
    if len(point):
        j = np.clip(np.searchsorted(t_start[point], pos, side="left"), 0, len(point) - 1)
        same = t_start[point[j]] == pos
        out = np.where(same, point[j], out)
    return out
