"""Rho-1 token selection: keep the top `ratio` of the labelled tokens by excess loss.

Scopes: "sequence" (top k within each row), "rank" (top k over this rank's micro-batch) and "global" (exact top k
over the union of the micro-batches of every rank of a process group).

The global top k never gathers the scores. Each token gets a unique composite key
(order-preserving integer of its float value, then a tie-break on its global index), and the k-th largest key is
found digit by digit, most significant byte first: each round histograms one byte of the keys still tied with
the answer into 256 bins, all-reduces the histogram (2 KiB whatever the number of ranks) and keeps the bin that
holds the k-th key. That is at most 4 rounds for the float32 value plus one per byte of the token index, and it
stops as soon as the bin reached holds exactly the keys still to take. Every rank makes the same choices
because it reads the same all-reduced histograms.

Tie rule (all scopes): among equal excess values, the token with the lower global index wins. The global index
of a token is its flat position in the concatenation of the ranks' [B, T] micro-batches in rank order, so DP=2
with 4 rows per rank selects exactly what DP=1 selects on the 8 concatenated rows.

k = ceil(ratio * n_valid), computed exactly on the decimal value of `ratio` as written (its shortest repr,
so 0.7 * 10 gives 7, not the 8 of float arithmetic). Any 0 < ratio keeps at least one token when there is one.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
import torch.distributed as dist

SCOPES = ("sequence", "rank", "global")
_DIGIT_BITS = 8
_BINS = 1 << _DIGIT_BITS


class NaNScoreError(ValueError):
    """A labelled token's score is NaN: there is no top-k. Raised on every rank of the group at once (the NaN
    count is all-reduced), so a caller may recover without leaving a rank in a collective."""


def num_to_keep(ratio: float, n: int) -> int:
    """ceil(ratio * n) on the decimal value of ratio as written: num_to_keep(0.7, 10) == 7."""
    check_ratio(ratio)
    return math.ceil(Fraction(repr(float(ratio))) * n)


def check_ratio(ratio: float) -> None:
    """ValueError unless 0 < ratio <= 1."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ValueError(f"selection ratio must be in (0, 1], got {ratio!r}")


def select_tokens(
    excess: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    scope: str = "global",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Bool mask of the tokens to train on: the top `ratio` of the valid tokens by excess loss.

    excess: [B, T] float; valid: [B, T] bool (tokens that carry a label; never selected otherwise).
    scope: "sequence" | "rank" | "global". group: the ranks that share a "global" selection
    (default: the world when torch.distributed is initialized, else this process alone); every rank of the
    group must call this together. Exactly ceil(ratio * n_valid) tokens are selected per row / rank / group.
    Raises ValueError on a bad ratio or scope, or a NaN excess on a valid token (for scope "global" on every
    rank of the group at once, so that none is left waiting in a collective).
    """
    return select_tokens_with_threshold(excess, valid, ratio, scope, group)[0]


def select_tokens_with_threshold(
    excess: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    scope: str = "global",
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, float]:
    """`select_tokens` plus the smallest excess among the selected tokens.

    For scope "global" that is the excess of the k-th selected token, identical on all ranks of the group. For the
    local scopes it is the smallest selected excess on this rank (over all rows). NaN when nothing is selected.
    """
    mask, threshold, _ = select_with_quantiles(excess, valid, ratio, scope, (), group)
    return mask, threshold


def select_with_quantiles(
    excess: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    scope: str,
    qs: Sequence[float] = (),
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, float, list[float]]:
    """(mask, threshold, global quantiles of the valid excess) — see select_tokens_with_threshold and
    global_quantiles. With scope "global" the quantile searches run in the same all-reduce rounds as the
    selection."""
    check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"selection scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if excess.shape != valid.shape or excess.dim() != 2:
        raise ValueError(f"excess {tuple(excess.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    group = resolve_group(group)
    valid = valid.bool()
    vals = excess.detach()
    if not vals.is_floating_point():
        raise ValueError(f"excess must be a float tensor, got {vals.dtype}")
    if scope == "global":
        member = valid.reshape(1, -1).expand(1 + len(qs), -1)
        info = _GroupCounts(vals, valid, group, reduce=True, member=member)
        ks = [num_to_keep(ratio, info.n_valid)] + [_quantile_rank(q, info.n_valid) for q in qs]
        value_only = [False] + [True] * len(qs)
        sel, rest = _radix_topk(vals.reshape(1, -1), info.index_keys(vals), info.index_bits, member, ks,
                                value_only, group, info.first_hist)
        kth = _kth_values(vals.reshape(1, -1), sel | rest, ks, group)
        mask = sel[0].view_as(valid)
        return mask, kth[0], kth[1:]

    _GroupCounts(vals, valid, group, reduce=False)  # the NaN check
    if scope == "sequence":
        ks = [num_to_keep(ratio, int(n)) for n in valid.sum(dim=1).tolist()]
        keys, member = vals, valid
    else:  # "rank"
        ks = [num_to_keep(ratio, int(valid.sum()))]
        keys, member = vals.reshape(1, -1), valid.reshape(1, -1)
    local_index = torch.arange(vals.numel(), device=vals.device).view_as(keys)
    index_keys = vals.numel() - 1 - local_index  # the lower index ranks higher
    sel, _ = _radix_topk(keys, index_keys, _index_bits(vals.numel()), member, ks, [False] * len(ks), None)
    mask = sel.view_as(valid)
    threshold = float(vals[mask].min()) if bool(mask.any()) else math.nan
    quantiles = global_quantiles(vals, valid, qs, group) if qs else []
    return mask, threshold, quantiles


def global_kth_largest(
    values: torch.Tensor, valid: torch.Tensor, k: int, group: dist.ProcessGroup | None = None
) -> float:
    """The k-th largest (1-based) of the valid values over every rank of `group`, identical on all ranks.

    Uses the same all-reduced radix search as the global selection; NaN when k == 0. ValueError when k exceeds
    the number of valid values or a valid value is NaN.
    """
    group = resolve_group(group)
    vals, valid = values.detach().reshape(1, -1), valid.bool().reshape(1, -1)
    info = _GroupCounts(vals, valid, group, reduce=True, member=valid)
    if not 0 <= k <= info.n_valid:
        raise ValueError(f"k={k} is outside [0, {info.n_valid}] valid values")
    sel, rest = _radix_topk(vals, None, 0, valid, [k], [True], group, info.first_hist)
    return _kth_values(vals, sel | rest, [k], group)[0]


def global_quantiles(
    values: torch.Tensor, valid: torch.Tensor, qs: Sequence[float], group: dist.ProcessGroup | None = None
) -> list[float]:
    """Exact quantiles of the valid values over every rank of `group`, identical on all ranks.

    The q-quantile of n values is the ascending order statistic at index floor(q * (n - 1)) (numpy's "lower"
    method). All quantiles are searched together: one all-reduce per round for all of them. NaN when there are
    no valid values.
    """
    for q in qs:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {q!r}")
    if not qs:
        return []
    group = resolve_group(group)
    vals, valid = values.detach().reshape(1, -1), valid.bool().reshape(1, -1)
    member = valid.expand(len(qs), -1)
    info = _GroupCounts(vals, valid, group, reduce=True, member=member)
    ks = [_quantile_rank(q, info.n_valid) for q in qs]
    sel, rest = _radix_topk(vals, None, 0, member, ks, [True] * len(ks), group, info.first_hist)
    return _kth_values(vals, sel | rest, ks, group)


# --------------------------------------------------------------------------------------------------------------


def resolve_group(group):
    """`group`, or the world when it is None and torch.distributed is initialized (None: one process)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def _quantile_rank(q: float, n: int) -> int:
    """Rank k (1-based, from the largest) of the "lower" q-quantile of n values; 0 when n == 0."""
    if n == 0:
        return 0
    pos = math.floor(Fraction(repr(float(q))) * (n - 1))  # ascending index, exact on the decimal q
    return n - pos


def _index_bits(n_total: int) -> int:
    return max(1, (n_total - 1).bit_length())


class _GroupCounts:
    """One all-reduce of [n_valid, n_nan, size of rank 0, ..., size of rank G-1]: the number of valid tokens of
    the group, whether any valid value is NaN, and this rank's offset in the concatenated token order.

    With `member` ([S, n] tokens of S radix searches) the same all-reduce carries the searches' first-round
    histogram (`first_hist`): that round does not depend on k, so it needs no collective of its own."""

    def __init__(self, vals: torch.Tensor, valid: torch.Tensor, group, reduce: bool, member=None):
        if not reduce:
            group = None
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        counts = torch.zeros(2 + world, dtype=torch.int64, device=vals.device)
        counts[0] = valid.sum()
        counts[1] = (valid & vals.isnan()).sum()
        counts[2 + rank] = vals.numel()
        n_counts = counts.numel()
        if member is not None:
            counts = torch.cat([counts, _histogram(_top_digit(vals), member).reshape(-1)])
        if group is not None:
            dist.all_reduce(counts, group=group)
        self.first_hist = counts[n_counts:].view(-1, _BINS) if member is not None else None
        counts = counts[:n_counts].tolist()
        if counts[1]:
            # Raised on every rank at once (the count is all-reduced), so no rank is left waiting in a collective.
            raise NaNScoreError(f"excess loss is NaN on {counts[1]} labelled token(s)")
        self.n_valid = counts[0]
        self.offset = sum(counts[2:2 + rank])
        self.n_total = sum(counts[2:])
        self.index_bits = _index_bits(self.n_total)

    def index_keys(self, vals: torch.Tensor) -> torch.Tensor:
        """Tie-break keys: larger for a lower global index."""
        index = self.offset + torch.arange(vals.numel(), device=vals.device)
        return (self.n_total - 1 - index).view(1, -1)


def _float_keys(vals: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Integer keys in the order of the float values (int64 bit patterns compared as unsigned), and their width.

    float64 keeps 64-bit keys; other float dtypes are compared as float32 (exact for fp16/bf16).
    """
    if vals.dtype != torch.float64:
        vals = vals.float()
    vals = vals + 0.0  # turns -0.0 into +0.0: equal floats get equal keys
    if vals.dtype == torch.float64:
        raw, sign_bit, nbits = vals.view(torch.int64), -(1 << 63), 64
    else:
        raw, sign_bit, nbits = vals.view(torch.int32).to(torch.int64), 1 << 31, 32
    # Negative floats: flip every bit (a larger magnitude sorts lower); others: set the sign bit.
    keys = torch.where(raw < 0, ~raw, raw ^ sign_bit)
    if nbits == 32:
        keys &= (1 << 32) - 1
    return keys, nbits


def _top_digit(values: torch.Tensor) -> torch.Tensor:
    """The most significant radix digit of each value's key (the first round's digit)."""
    keys, nbits = _float_keys(values.reshape(1, -1))
    return (keys >> (nbits - _DIGIT_BITS)) & (_BINS - 1)


def _histogram(digit: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[S, 256] counts of each search's candidate tokens per digit value (digit: [1 or S, n])."""
    hist = torch.zeros(cand.shape[0], _BINS, dtype=torch.int64, device=cand.device)
    return hist.scatter_add_(1, digit.expand_as(cand), cand.long())


def _radix_topk(values, index_keys, index_bits, member, ks, value_only, group, first_hist=None):
    """Exact top-k of several searches at once by (value, index key), most significant digit first.

    values: [1 or S, n] float; index_keys: [1 or S, n] int64 tie-break keys (larger wins) with index_bits bits;
    member: [S, n] bool tokens each search ranks; ks: S counts (identical on every rank); value_only: searches
    that only need the k-th value (they stop after the value digits). Returns (sel, rest): sel [S, n] the tokens
    surely in the top k; rest [S, n] tokens tied with the k-th at the end of a value-only search (empty for the
    others, whose sel then holds exactly k tokens over the group). first_hist: the group's histogram of the
    first digit over `member`, when the caller already all-reduced it (_GroupCounts).
    """
    s_count, n = member.shape
    vkeys, vbits = _float_keys(values)
    digits = [(vkeys, shift, False) for shift in range(vbits - _DIGIT_BITS, -1, -_DIGIT_BITS)]
    ibits = -(-index_bits // _DIGIT_BITS) * _DIGIT_BITS
    digits += [(index_keys, shift, True) for shift in range(ibits - _DIGIT_BITS, -1, -_DIGIT_BITS)]

    dev = member.device
    k_rem = torch.tensor(ks, dtype=torch.int64, device=dev)
    value_only_t = torch.tensor(value_only, dtype=torch.bool, device=dev)
    active = k_rem > 0
    cand = member & active[:, None]
    sel = torch.zeros_like(cand)
    bins = torch.arange(_BINS, device=dev)
    for keys, shift, is_index in digits:
        if is_index:  # value-only searches are done: their remaining candidates all hold the k-th value
            active &= ~value_only_t
        if not bool(active.any()):
            break
        digit = ((keys >> shift) & (_BINS - 1)).expand(s_count, n)
        if first_hist is not None:  # idle searches' rows are never read: every use below is masked by `active`
            hist, first_hist = first_hist, None
        else:
            hist = _histogram(digit, cand & active[:, None])
            if group is not None:
                dist.all_reduce(hist, group=group)  # 2 KiB per search, whatever the number of ranks
        above = hist.flip(1).cumsum(1).flip(1) - hist  # candidates in strictly higher bins
        # The bin holding the k-th remaining key: above < k_rem <= above + hist (the first bin for an idle search).
        hit = (above < k_rem[:, None]) & (above + hist >= k_rem[:, None])
        b = torch.where(hit, bins, -1).amax(dim=1).clamp_min(0)
        take = active[:, None] & cand
        sel |= take & (digit > b[:, None])
        k_rem = torch.where(active, k_rem - above.gather(1, b[:, None]).squeeze(1), k_rem)
        cand = torch.where(active[:, None], cand & (digit == b[:, None]), cand)
        # When the bin holds exactly the keys still to take, take them all and stop that search.
        done = active & (hist.gather(1, b[:, None]).squeeze(1) == k_rem)
        sel |= cand & done[:, None]
        cand &= ~done[:, None]
        k_rem = torch.where(done, 0, k_rem)
        active &= ~done
    rest = cand & value_only_t[:, None]
    return sel, rest


def _kth_values(values: torch.Tensor, chosen: torch.Tensor, ks: Sequence[int], group) -> list[float]:
    """Smallest value among each search's chosen tokens over the group (one all-reduce MIN); NaN where k == 0."""
    vals = values.detach().to(torch.float64).expand_as(chosen)
    if chosen.shape[1]:
        mins = torch.where(chosen, vals, math.inf).amin(dim=1)
    else:
        mins = torch.full((chosen.shape[0],), math.inf, dtype=torch.float64, device=chosen.device)
    if group is not None:
        dist.all_reduce(mins, op=dist.ReduceOp.MIN, group=group)
    return [v if k > 0 else math.nan for v, k in zip(mins.tolist(), ks)]
