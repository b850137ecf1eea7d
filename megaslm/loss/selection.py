"""Rho-1 token selection: keep the top `ratio` of the labelled tokens by excess loss.

Scopes: "sequence" (top k within each row), "rank" (top k over this rank's micro-batch) and "global" (exact top k
over the union of the micro-batches of every rank of a process group).

The global top k never gathers the scores. Each token's float value gets an order-preserving integer key, and
the k-th largest key is found digit by digit, most significant 16 bits first: each round histograms one digit of
the keys still tied with the answer into 65536 bins, all-reduces the histogram (512 KiB whatever the number of
ranks) and keeps the bin that holds the k-th key: 2 rounds for float32 (bf16, fp16) scores, 4 for float64, the
first riding on the all-reduce of the counts. The tokens tied at the k-th value are then split by the tie rule
with one all-reduce of each rank's tied count. Every rank makes the same choices because it reads the same
all-reduced values, and nothing waits on the host: k, the digits, the threshold and the quantiles stay device
tensors (`select_on_device`); the number of rounds is fixed. The local scopes sort on the device instead.

Tie rule (all scopes): among equal excess values, the token with the lower global index wins. The global index
of a token is its flat position in the concatenation of the ranks' [B, T] micro-batches in rank order, so DP=2
with 4 rows per rank selects exactly what DP=1 selects on the 8 concatenated rows.

k = ceil(ratio * n_valid), computed exactly on the decimal value of `ratio` as written (its shortest repr,
so 0.7 * 10 gives 7, not the 8 of float arithmetic; `keep_count` does the same on the device). Any 0 < ratio keeps
at least one token when there is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
import torch.distributed as dist

from megaslm.loss.choices import SCOPES

_DIGIT_BITS = 16  # 2 rounds for a float32 key; a histogram of 65536 int64 bins is 512 KiB
_BINS = 1 << _DIGIT_BITS
_EXACT_INT64 = 1 << 62  # ratios whose reduced fraction has larger terms take the host path in keep_count


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
    selection. One host sync (threshold, quantiles and the NaN count together); `select_on_device` has none."""
    sel = select_on_device(excess, valid, ratio, scope, qs, group)
    host = torch.cat([sel.n_nan.double().view(1), sel.threshold.view(1), sel.quantiles]).tolist()  # host sync
    _raise_on_nan(host[0])
    return sel.mask, host[1], host[2:]


@dataclass
class Selection:
    """What `select_on_device` returns: device tensors only (nothing here waits for the device)."""
    mask: torch.Tensor  # bool [B, T]: the tokens to train on
    k: torch.Tensor  # int64: tokens to keep (global: [] for the group; rank: []; sequence: [B], one per row)
    threshold: torch.Tensor  # float64 []: the k-th selected excess (global), else the lowest selected; NaN if none
    quantiles: torch.Tensor  # float64 [len(qs)]: exact quantiles of the group's valid excess; NaN without tokens
    n_nan: torch.Tensor  # int64 []: labelled tokens with a NaN excess (global: over the group); > 0 voids the rest


def select_on_device(
    excess: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    scope: str,
    qs: Sequence[float] = (),
    group: dist.ProcessGroup | None = None,
) -> Selection:
    """`select_with_quantiles` without a host sync: k, the radix search, the threshold and the quantiles stay on
    the device, and a NaN excess is counted (`n_nan`) instead of raised. Scope "global" costs 3 collectives
    (float32/bf16/fp16 scores; 5 for float64) whatever the world size: the counts with the first 16-bit digit's
    histogram, the second digit's histogram, and the per-rank count of tokens tied at the k-th value. The local
    scopes sort each row / the rank's tokens on the device; their quantiles are global (2 collectives)."""
    check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"selection scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if excess.shape != valid.shape or excess.dim() != 2:
        raise ValueError(f"excess {tuple(excess.shape)} and valid {tuple(valid.shape)} must both be [B, T]")
    for q in qs:
        _check_quantile(q)
    group = resolve_group(group)
    valid = valid.bool()
    vals = excess.detach()
    if not vals.is_floating_point():
        raise ValueError(f"excess must be a float tensor, got {vals.dtype}")
    if scope == "global":
        flat, member_1 = vals.reshape(1, -1), valid.reshape(1, -1)
        member = member_1.expand(1 + len(qs), -1)
        counts = _GroupCounts(flat, member_1, group, member=member)
        k = keep_count(ratio, counts.n_valid)
        ks = torch.stack([k] + [_quantile_rank_t(q, counts.n_valid) for q in qs])
        sel, kth = _radix_select(flat, member, ks, [True] + [False] * len(qs), group, counts.first_hist)
        return Selection(sel[0].view_as(valid), k, kth[0], kth[1:], counts.n_nan)

    n_nan = (valid & vals.isnan()).sum()
    if scope == "sequence":
        k = keep_count(ratio, valid.sum(dim=1))
        mask = _sorted_topk(vals, valid, k)
    else:  # "rank"
        k = keep_count(ratio, valid.sum())
        mask = _sorted_topk(vals.reshape(1, -1), valid.reshape(1, -1), k.view(1)).view_as(valid)
    low = torch.where(mask, vals.double(), math.inf).amin() if vals.numel() else vals.new_tensor(math.inf).double()
    threshold = torch.where(mask.any(), low, math.nan)
    quantiles = _global_quantiles_t(vals, valid, qs, group) if qs else torch.zeros(0, dtype=torch.float64,
                                                                                   device=vals.device)
    return Selection(mask, k, threshold, quantiles, n_nan)


def global_kth_largest(
    values: torch.Tensor, valid: torch.Tensor, k: int, group: dist.ProcessGroup | None = None
) -> float:
    """The k-th largest (1-based) of the valid values over every rank of `group`, identical on all ranks.

    Uses the same all-reduced radix search as the global selection; NaN when k == 0. ValueError when k exceeds
    the number of valid values or a valid value is NaN.
    """
    group = resolve_group(group)
    vals, valid = values.detach().reshape(1, -1), valid.bool().reshape(1, -1)
    counts = _GroupCounts(vals, valid, group, member=valid)
    ks = torch.full((1,), int(k), dtype=torch.int64, device=vals.device)
    _, kth = _radix_select(vals, valid, ks, [False], group, counts.first_hist)
    n_valid, n_nan, value = torch.stack([counts.n_valid.double(), counts.n_nan.double(), kth[0]]).tolist()
    _raise_on_nan(n_nan)
    if not 0 <= k <= n_valid:
        raise ValueError(f"k={k} is outside [0, {int(n_valid)}] valid values")
    return value


def global_quantiles(
    values: torch.Tensor, valid: torch.Tensor, qs: Sequence[float], group: dist.ProcessGroup | None = None
) -> list[float]:
    """Exact quantiles of the valid values over every rank of `group`, identical on all ranks.

    The q-quantile of n values is the ascending order statistic at index floor(q * (n - 1)) (numpy's "lower"
    method). All quantiles are searched together: one all-reduce per round for all of them. NaN when there are
    no valid values.
    """
    for q in qs:
        _check_quantile(q)
    if not qs:
        return []
    return _global_quantiles_t(values, valid, qs, resolve_group(group)).tolist()


# --------------------------------------------------------------------------------------------------------------


def resolve_group(group):
    """`group`, or the world when it is None and torch.distributed is initialized (None: one process)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def _check_quantile(q: float) -> None:
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q!r}")


def _raise_on_nan(n_nan: float) -> None:
    if n_nan:
        # Raised on every rank at once (the count is all-reduced), so no rank is left waiting in a collective.
        raise NaNScoreError(f"excess loss is NaN on {int(n_nan)} labelled token(s)")


def _exact_ratio(x: float) -> tuple[int, int]:
    return Fraction(repr(float(x))).as_integer_ratio()


def _exact_round(p: int, q: int, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, d) with m the nearest integer to p * n / q and d = p * n - m * q exactly, on the device.

    m comes from float64 (within 1/2 + 2^-22 of the exact quotient for n < 2^31); d is computed in int64 whose
    products wrap modulo 2^64, and since |d| < q < 2^63 the wrapped result is the exact one."""
    n = n.to(torch.int64)
    m = torch.round(n.double() * (p / q)).to(torch.int64)
    return m, n * p - m * q


def keep_count(ratio: float, n: torch.Tensor) -> torch.Tensor:
    """num_to_keep on the device: ceil(ratio * n) exactly on the decimal value of ratio, elementwise. A ratio
    with more than ~18 decimal places (terms beyond int64) is done on the host instead: one sync."""
    p, q = _exact_ratio(ratio)
    if q >= _EXACT_INT64:
        return torch.tensor([num_to_keep(ratio, int(x)) for x in n.reshape(-1).tolist()],  # host sync
                            dtype=torch.int64, device=n.device).view(n.shape)
    m, d = _exact_round(p, q, n)
    return torch.where(d > 0, m + 1, m)


def _quantile_rank_t(q: float, n: torch.Tensor) -> torch.Tensor:
    """_quantile_rank on the device: n - floor(q * (n - 1)), 0 when n == 0."""
    p, den = _exact_ratio(q)
    if den >= _EXACT_INT64:
        return torch.tensor([_quantile_rank(q, int(x)) for x in n.reshape(-1).tolist()],  # host sync
                            dtype=torch.int64, device=n.device).view(n.shape)
    m, d = _exact_round(p, den, n - 1)
    pos = torch.where(d < 0, m - 1, m)
    return torch.where(n > 0, n - pos, 0)


def _quantile_rank(q: float, n: int) -> int:
    """Rank k (1-based, from the largest) of the "lower" q-quantile of n values; 0 when n == 0."""
    if n == 0:
        return 0
    pos = math.floor(Fraction(repr(float(q))) * (n - 1))  # ascending index, exact on the decimal q
    return n - pos


class _GroupCounts:
    """One all-reduce of [n_valid, n_nan, first-digit histograms of the S searches over `member`]: the group's
    number of valid tokens, how many of them are NaN, and the first radix round (it does not depend on k)."""

    def __init__(self, vals: torch.Tensor, valid: torch.Tensor, group, member: torch.Tensor):
        keys, nbits = _float_keys(vals)
        top = (keys >> (nbits - _DIGIT_BITS)) & (_BINS - 1)
        head = torch.stack([valid.sum(), (valid & vals.isnan()).sum()])
        vec = torch.cat([head, _histogram(top, member).reshape(-1)])
        if group is not None:
            dist.all_reduce(vec, group=group)
        self.n_valid, self.n_nan = vec[0], vec[1]
        self.first_hist = vec[2:].view(-1, _BINS)


def _global_quantiles_t(values, valid, qs, group) -> torch.Tensor:
    vals, valid = values.detach().reshape(1, -1), valid.bool().reshape(1, -1)
    member = valid.expand(len(qs), -1)
    counts = _GroupCounts(vals, valid, group, member=member)
    ks = torch.stack([_quantile_rank_t(q, counts.n_valid) for q in qs])
    return _radix_select(vals, member, ks, [False] * len(qs), group, counts.first_hist)[1]


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


def _key_values(keys: torch.Tensor, nbits: int) -> torch.Tensor:
    """The float64 values of _float_keys keys (the inverse map)."""
    if nbits == 64:
        raw = torch.where(keys < 0, keys ^ -(1 << 63), ~keys)
        return raw.view(torch.float64).clone()
    raw = torch.where(keys >= (1 << 31), keys ^ (1 << 31), ~keys & ((1 << 32) - 1))
    raw = torch.where(raw >= (1 << 31), raw - (1 << 32), raw).to(torch.int32)  # the int32 bit pattern
    return raw.view(torch.float32).double()


def _histogram(digit: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """[S, bins] counts of each search's candidate tokens per digit value (digit: [1 or S, n])."""
    hist = torch.zeros(cand.shape[0], _BINS, dtype=torch.int64, device=cand.device)
    return hist.scatter_add_(1, digit.expand_as(cand), cand.long())


def _radix_select(values, member, ks, with_mask, group, first_hist):
    """The k-th largest key of S searches at once, most significant 16-bit digit first, in a fixed number of
    rounds (no host decision): values [1, n] float; member [S, n] tokens each search ranks; ks [S] int64 device
    counts (identical on every rank); first_hist: the group's first-digit histogram (_GroupCounts).

    Returns (mask [S, n]: for the searches with `with_mask`, exactly k tokens over the group, ties at the k-th
    value going to the lower global index; the others' rows are undefined, kth [S] float64 the k-th value, NaN
    where k == 0). Global index = rank-major concatenation of the ranks' tokens: the ties are split with one
    all-reduce of each rank's tied count, rank r taking the first of its tied tokens that ranks below r left.
    """
    s_count, n = member.shape
    keys, nbits = _float_keys(values)
    dev = member.device
    k_rem = ks.clone()
    cand = member & (ks > 0)[:, None]
    sel = torch.zeros_like(cand)
    kth_key = torch.zeros(s_count, dtype=torch.int64, device=dev)
    bins = torch.arange(_BINS, device=dev)
    for shift in range(nbits - _DIGIT_BITS, -1, -_DIGIT_BITS):
        digit = ((keys >> shift) & (_BINS - 1)).expand(s_count, n)
        if first_hist is not None:
            hist, first_hist = first_hist, None
        else:
            hist = _histogram(digit, cand)
            if group is not None:
                dist.all_reduce(hist, group=group)  # 512 KiB per search, whatever the number of ranks
        above = hist.flip(1).cumsum(1).flip(1) - hist  # candidates in strictly higher bins
        # The bin holding the k-th remaining key: above < k_rem <= above + hist (bin 0 for a search with k == 0).
        hit = (above < k_rem[:, None]) & (above + hist >= k_rem[:, None])
        b = torch.where(hit, bins, -1).amax(dim=1).clamp_min(0)
        sel |= cand & (digit > b[:, None])
        k_rem = k_rem - above.gather(1, b[:, None]).squeeze(1)
        cand = cand & (digit == b[:, None])
        kth_key = kth_key | (b << shift)
    # cand: the tokens whose key is the k-th key; k_rem of them (over the group) are to be taken.
    if any(with_mask):
        tied = cand.sum(dim=1)
        before = torch.zeros_like(tied)
        if group is not None:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            per_rank = torch.zeros(world, s_count, dtype=torch.int64, device=dev)
            per_rank[rank] = tied
            dist.all_reduce(per_rank, group=group)  # one [G, S] int64 vector: the ties' split over the ranks
            before = per_rank[:rank].sum(dim=0)
        take = (k_rem - before).clamp(min=0)
        sel |= cand & (cand.long().cumsum(dim=1) <= take[:, None])
    kth = torch.where(ks > 0, _key_values(kth_key, nbits), math.nan)
    return sel, kth


def _sorted_topk(vals: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top k[r] valid tokens of each row r by (value desc, index asc), by one stable sort on the device."""
    keys, nbits = _float_keys(vals)
    if nbits == 32:  # unsigned order -> signed int64 order
        skeys = keys - (1 << 31)
    else:
        skeys = keys ^ -(1 << 63)
    skeys = torch.where(valid, skeys, torch.iinfo(torch.int64).min)
    order = torch.sort(skeys, dim=1, descending=True, stable=True).indices
    keep = torch.arange(vals.shape[1], device=vals.device)[None, :] < k[:, None]
    return torch.zeros_like(valid).scatter_(1, order, keep)
