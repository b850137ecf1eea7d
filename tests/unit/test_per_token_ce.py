"""per_token_ce against F.cross_entropy on the full logits, with autograd for the gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megaslm.loss import per_token_ce


def _inputs(shape, hidden_size, vocab, dtype, seed=0, scale=1.0, ignore_frac=0.25, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*shape, hidden_size, generator=g) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    grad_out = torch.rand(shape, generator=g) + 0.5  # non-uniform upstream gradient
    return hidden, weight, labels, grad_out


def _reference(hidden, weight, labels, grad_out, ignore_index=-100, upcast=True):
    """Full-logits CE and its autograd gradients (logits upcast to fp32 like the head does, or not)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logits = h @ w.t()
    if upcast:
        logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), labels.reshape(-1), reduction="none",
                           ignore_index=ignore_index).view(labels.shape)
    (loss.float() * grad_out).sum().backward()
    return loss.detach().float(), h.grad, w.grad


def _ours(hidden, weight, labels, grad_out, **kw):
    loss = per_token_ce(hidden, weight, labels, **kw)
    (loss * grad_out).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16, 1000])
@pytest.mark.parametrize("shape", [(37,), (3, 11), (2, 3, 5)])
def test_fp32_matches_full_logits(shape, chunk_size):
    hidden, weight, labels, grad_out = _inputs(shape, 24, 53, torch.float32)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_large_logits_stay_finite_and_exact():
    # Logits in the hundreds: a naive exp would overflow; the max-shifted one must match.
    hidden, weight, labels, grad_out = _inputs((4, 9), 16, 31, torch.float32, scale=300.0)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=7)
    assert torch.isfinite(loss).all() and loss.max() > 50
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    # exp(logit - lse) at |logit| ~ 300 carries fp32 rounding of ~3e-5 relative, in both computations, and a
    # recompute on fewer rows (ignored ones dropped) may round a logit an ulp apart from the forward's. grad_w
    # sums products of ~300 that cancel (max |grad_w| ~ 1300): compare it normwise.
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4 * float(ref_gw.abs().max()))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_bf16_within_bf16_tolerance(chunk_size):
    hidden, weight, labels, grad_out = _inputs((3, 13), 32, 61, torch.bfloat16)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    # Against the exact fp32 computation on the same (bf16-representable) inputs ...
    ref_loss, ref_gh, ref_gw = _reference(hidden.float(), weight.float(), labels, grad_out)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.float(), ref_gh, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), ref_gw, rtol=2e-2, atol=2e-2)
    # ... and against F.cross_entropy run on bf16 logits.
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out, upcast=False)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=2e-2, atol=2e-2)


def test_ignored_positions_give_exact_zeros_and_custom_ignore_index():
    hidden, weight, labels, grad_out = _inputs((5, 8), 12, 29, torch.float32, ignore_frac=0.4, ignore_index=-1)
    ignored = labels == -1
    assert ignored.any() and (~ignored).any()
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out, ignore_index=-1)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, ignore_index=-1, chunk_size=3)
    assert (loss[ignored] == 0).all() and (gh[ignored] == 0).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_all_ignored_input():
    hidden, weight, labels, grad_out = _inputs((2, 6), 8, 17, torch.float32)
    labels.fill_(-100)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=4)
    assert (loss == 0).all() and (gh == 0).all() and (gw == 0).all()


def test_masked_mean_upstream_gradient():
    # The trainer backpropagates a mean over selected tokens: a 0/1 mask divided by a count.
    hidden, weight, labels, _ = _inputs((4, 10), 16, 41, torch.float32)
    mask = torch.rand(4, 10, generator=torch.Generator().manual_seed(3)) < 0.5
    grad_out = mask.float() / mask.sum()
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    loss = per_token_ce(hidden, weight, labels, chunk_size=6)
    (torch.where(mask, loss, 0.0).sum() / mask.sum()).backward()
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-5, atol=1e-7)


def test_frozen_inputs_and_no_grad():
    hidden, weight, labels, grad_out = _inputs((3, 7), 8, 19, torch.float32)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    # Frozen weight (e.g. tied embeddings kept fixed): only hidden gets a gradient.
    w = weight.detach()
    loss = per_token_ce(hidden, w, labels, chunk_size=5)
    (loss * grad_out).sum().backward()
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-5, atol=1e-6)
    assert w.grad is None
    # Frozen hidden: only the weight gets one.
    h = hidden.detach()
    (per_token_ce(h, weight, labels, chunk_size=5) * grad_out).sum().backward()
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-5, atol=1e-6)
    # The reference model's call: no graph at all.
    with torch.no_grad():
        out = per_token_ce(hidden, weight, labels)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref_loss, rtol=1e-5, atol=1e-5)


def test_non_contiguous_hidden():
    hidden, weight, labels, grad_out = _inputs((6, 4), 8, 23, torch.float32)
    hidden_t = hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not hidden_t.is_contiguous()
    ref_loss, ref_gh, _ = _reference(hidden, weight, labels, grad_out)
    loss, gh, _ = _ours(hidden_t, weight, labels, grad_out, chunk_size=5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    hidden, weight, labels, _ = _inputs((2, 5), 8, 11, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        per_token_ce(hidden, weight, torch.full_like(labels, 11))
    with pytest.raises(ValueError, match="does not match labels"):
        per_token_ce(hidden, weight, labels[:, :4])
    with pytest.raises(ValueError, match="hidden size"):
        per_token_ce(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        per_token_ce(hidden, weight, labels, chunk_size=0)


# ---- memory: the full [tokens, vocab] logits must never exist --------------------------------------------------

N_TOKENS, VOCAB, HIDDEN, CHUNK = 96, 80, 8, 8  # N*V = 7680 is far above every other tensor in play


def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sizes, out


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor produced by any operator."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_logits_saved_for_backward():
    hidden, weight, labels, grad_out = _inputs((N_TOKENS,), HIDDEN, VOCAB, torch.float32)
    naive_sizes, _ = _saved_numels(
        lambda: F.cross_entropy(hidden @ weight.t(), labels, reduction="none"))
    assert max(naive_sizes) >= N_TOKENS * VOCAB  # the probe does see the naive path's logits
    sizes, loss = _saved_numels(lambda: per_token_ce(hidden, weight, labels, chunk_size=CHUNK))
    assert max(sizes) <= max(VOCAB * HIDDEN, N_TOKENS * HIDDEN)  # inputs and per-token vectors only
    (loss * grad_out).sum().backward()


def test_no_full_logits_in_forward_or_backward():
    hidden, weight, labels, grad_out = _inputs((N_TOKENS,), HIDDEN, VOCAB, torch.float32)
    bound = max(CHUNK * VOCAB, VOCAB * HIDDEN, N_TOKENS * HIDDEN)
    naive = _LargestOutput()
    with naive:
        (F.cross_entropy(hidden @ weight.t(), labels, reduction="none") * grad_out).sum().backward()
    assert naive.largest >= N_TOKENS * VOCAB > bound
    hidden.grad = weight.grad = None
    mode = _LargestOutput()
    with mode:
        (per_token_ce(hidden, weight, labels, chunk_size=CHUNK) * grad_out).sum().backward()
    assert mode.largest <= bound
    assert hidden.grad is not None and weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_chunk_of_logits_alive_at_a_time(monkeypatch, dtype):
    import importlib
    import weakref

    ptc = importlib.import_module("megaslm.loss.tiles")  # the tile code both heads call

    live, peak = [0], [0]
    real = ptc.chunk_logits

    def tracked(h, w):
        out = real(h, w)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, lambda: live.__setitem__(0, live[0] - 1))
        return out

    monkeypatch.setattr(ptc, "chunk_logits", tracked)
    hidden, weight, labels, grad_out = _inputs((N_TOKENS,), HIDDEN, VOCAB, dtype)
    (per_token_ce(hidden, weight, labels, chunk_size=CHUNK) * grad_out).sum().backward()
    assert peak[0] == 1 and live[0] == 0


# ---- SLM-aware backward and kept softmax ------------------------------------------------------------------------


def _selected_grad(shape, frac, seed=7):
    """Upstream gradient of a masked mean: nonzero on about `frac` of the tokens, exactly 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < frac
    return mask.float() * (torch.rand(shape, generator=g) + 0.5)


@pytest.mark.parametrize("keep_chunks", [0, 1, 100])
@pytest.mark.parametrize("chunk_size", [None, 4, 7])
def test_sparse_upstream_gradient_matches_full_logits(chunk_size, keep_chunks):
    hidden, weight, labels, _ = _inputs((3, 13), 16, 43, torch.float32)
    grad_out = _selected_grad((3, 13), 0.6)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    keep = keep_chunks * 4 * (chunk_size or 39) * 10
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=chunk_size, vocab_block=10, keep_bytes=keep)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert (gh[grad_out == 0] == 0).all()  # exactly 0, not merely small


@pytest.mark.parametrize("keep_chunks", [0, 2])
def test_sparse_upstream_gradient_bf16_weight(keep_chunks):
    hidden, weight, labels, _ = _inputs((4, 11), 32, 61, torch.bfloat16)
    grad_out = _selected_grad((4, 11), 0.6, seed=9)
    loss, gh, gw = _ours(hidden, weight, labels, grad_out, chunk_size=5, vocab_block=16,
                         keep_bytes=keep_chunks * 4 * 5 * 16)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    for upcast in (True, False):  # fp32 logits of the same inputs, and F.cross_entropy on bf16 logits
        h, w = (hidden.float(), weight.float()) if upcast else (hidden, weight)
        _, ref_gh, ref_gw = _reference(h, w, labels, grad_out, upcast=upcast)
        torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=2e-2, atol=2e-2)
    assert (gh[grad_out == 0] == 0).all()


def _count_logit_values(monkeypatch):
    import importlib

    ptc = importlib.import_module("megaslm.loss.tiles")
    values = []
    real = ptc.chunk_logits

    def counting(h, w):
        values.append(h.shape[0] * w.shape[0])
        return real(h, w)

    monkeypatch.setattr(ptc, "chunk_logits", counting)
    return values


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_backward_recomputes_only_rows_with_a_gradient(monkeypatch, chunk_size):
    values = _count_logit_values(monkeypatch)
    hidden, weight, labels, _ = _inputs((60,), 8, 37, torch.float32, ignore_frac=0.0)
    grad_out = _selected_grad((60,), 0.6)
    loss = per_token_ce(hidden, weight, labels, chunk_size=chunk_size, vocab_block=10)
    assert sum(values) == 60 * 37  # forward: every token's logits
    values.clear()
    (loss * grad_out).sum().backward()
    live = int((grad_out != 0).sum())
    assert 0 < live < 60 and sum(values) == live * 37


def test_kept_softmax_skips_the_recompute(monkeypatch):
    values = _count_logit_values(monkeypatch)
    hidden, weight, labels, grad_out = _inputs((40,), 8, 37, torch.float32)
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    # Budget for 3 tiles of 8 tokens x 16 vocabulary rows: tokens 0-7 keep theirs (the vocab is 3 blocks).
    loss = per_token_ce(hidden, weight, labels, chunk_size=8, vocab_block=16, keep_bytes=3 * 8 * 16 * 4 + 5)
    values.clear()
    (loss * grad_out).sum().backward()
    assert sum(values) == int((labels[8:] != -100).sum()) * 37
    torch.testing.assert_close(hidden.grad, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_gw, rtol=1e-5, atol=1e-6)
    # Nothing is kept without a graph (the reference model's call), whatever the budget.
    values.clear()
    with torch.no_grad():
        per_token_ce(hidden, weight, labels, chunk_size=8, keep_bytes=10**9)
    assert sum(values) == 40 * 37


def test_default_block_follows_the_problem():
    from megaslm.loss.per_token_ce import MIN_VOCAB_BLOCK, default_vocab_block

    assert default_vocab_block(4096) == 2048  # a [tokens, 2048] fp32 block: half of 4096-wide fp32 hidden states
    assert default_vocab_block(64) == MIN_VOCAB_BLOCK
    for kw in ({"keep_bytes": -1}, {"vocab_block": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            per_token_ce(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), **kw)


# ---- fused head: gradients formed in the forward (CLM) --------------------------------------------------------


def _fused(hidden, weight, labels, scale, weights=None, **kw):
    """The trainer's CLM call: weights up front (the labelled tokens), the scalar normaliser in backward."""
    w = (labels != -100) if weights is None else weights
    loss = per_token_ce(hidden, weight, labels, grad_weights=w, **kw)
    (torch.where(labels != -100, loss * w.float(), 0.0).sum() * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("fused_chunk", [None, 1, 5, 16])
@pytest.mark.parametrize("shape", [(37,), (3, 11)])
def test_fused_fp32_matches_full_logits(shape, fused_chunk):
    hidden, weight, labels, _ = _inputs(shape, 24, 53, torch.float32)
    scale = 1 / 7.0
    grad_out = (labels != -100).float() * scale
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    plain = per_token_ce(hidden.detach(), weight.detach(), labels)
    loss, gh, gw = _fused(hidden, weight, labels, scale, fused_chunk=fused_chunk, vocab_block=10)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert (gh[labels == -100] == 0).all()


def test_fused_real_weights_and_large_logits():
    hidden, weight, labels, _ = _inputs((4, 9), 16, 31, torch.float32, scale=300.0)
    weights = torch.rand(4, 9, generator=torch.Generator().manual_seed(5)) + 0.25  # soft, known up front
    grad_out = torch.where(labels != -100, weights, 0.0) * 0.03
    ref_loss, ref_gh, ref_gw = _reference(hidden, weight, labels, grad_out)
    loss, gh, gw = _fused(hidden, weight, labels, 0.03, weights=weights, fused_chunk=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-4, atol=1e-4 * float(ref_gw.abs().max()))


@pytest.mark.parametrize("fused_chunk", [None, 4])
def test_fused_bf16_weights(fused_chunk):
    hidden, weight, labels, _ = _inputs((3, 13), 32, 61, torch.bfloat16)
    scale = 0.05
    loss, gh, gw = _fused(hidden, weight, labels, scale, fused_chunk=fused_chunk, vocab_block=16)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    grad_out = (labels != -100).float() * scale
    for upcast in (True, False):
        h, w = (hidden.float(), weight.float()) if upcast else (hidden, weight)
        ref_loss, ref_gh, ref_gw = _reference(h, w, labels, grad_out, upcast=upcast)
        torch.testing.assert_close(loss, ref_loss.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(gh.float(), ref_gh.float(), rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(gw.float(), ref_gw.float(), rtol=2e-2, atol=2e-3)


def test_fused_runs_three_head_matmuls(monkeypatch):
    values = _count_logit_values(monkeypatch)
    hidden, weight, labels, _ = _inputs((40,), 8, 37, torch.float32)
    _fused(hidden, weight, labels, 0.1, fused_chunk=16, vocab_block=10)
    assert sum(values) == 40 * 37  # the logits once, in the forward: nothing recomputed in backward


def test_fused_holds_one_chunk_of_tiles():
    hidden, weight, labels, _ = _inputs((N_TOKENS,), HIDDEN, VOCAB, torch.float32)
    mode = _LargestOutput()
    with mode:
        _fused(hidden, weight, labels, 0.5, fused_chunk=CHUNK, vocab_block=16)
    assert mode.largest <= max(CHUNK * 16, VOCAB * HIDDEN, N_TOKENS * HIDDEN)


def test_fused_wrong_upstream_gradient_gives_nan_and_zero_gives_zero():
    hidden, weight, labels, grad_out = _inputs((3, 7), 8, 19, torch.float32)
    loss = per_token_ce(hidden, weight, labels, grad_weights=labels != -100)
    (loss * grad_out).sum().backward()  # not r * weights: refused without a host sync
    assert hidden.grad.isnan().all() and weight.grad.isnan().all()
    hidden.grad = weight.grad = None
    loss = per_token_ce(hidden, weight, labels, grad_weights=labels != -100)
    (loss.sum() * 0.0).backward()  # a zeroed step (NaN losses): exact zeros
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()
    with torch.no_grad():  # no graph: the plain forward, same losses
        torch.testing.assert_close(per_token_ce(hidden, weight, labels, grad_weights=labels != -100),
                                   loss.detach())


def test_unchecked_labels_give_nan_without_a_sync():
    hidden, weight, labels, _ = _inputs((2, 5), 8, 11, torch.float32, ignore_frac=0.0)
    labels[0, 1] = 11
    loss = per_token_ce(hidden, weight, labels, check_labels=False)
    assert loss[0, 1].isnan() and loss.isnan().sum() == 1


def test_shard_range_is_tensor_split():
    from megaslm.loss.per_token_ce import shard_range

    for vocab, world in ((101, 2), (101, 3), (2, 3), (32000, 8)):
        parts = torch.tensor_split(torch.arange(vocab), world)
        for r, p in enumerate(parts):
            start, rows = shard_range(vocab, world, r)
            assert rows == p.numel() and (rows == 0 or start == int(p[0]))


def test_no_grad_and_fused_calls_use_wide_blocks(monkeypatch):
    from megaslm.loss.per_token_ce import WIDE_VOCAB_BLOCK

    widths = []
    import importlib

    ptc = importlib.import_module("megaslm.loss.tiles")
    real = ptc.chunk_logits
    monkeypatch.setattr(ptc, "chunk_logits", lambda h, w: widths.append(w.shape[0]) or real(h, w))
    hidden, weight, labels, _ = _inputs((40,), 8, 3000, torch.float32)
    with torch.no_grad():
        per_token_ce(hidden, weight, labels)
    assert max(widths) == WIDE_VOCAB_BLOCK
    widths.clear()
    (per_token_ce(hidden, weight, labels) * 1.0).sum().backward()  # the recompute path keeps the default
    assert max(widths) == 128
    widths.clear()
    _fused(hidden, weight, labels, 0.5)
    assert max(widths) == WIDE_VOCAB_BLOCK
