"""ESLM's rule (megaslm/loss/rules/eslm.py): the entropy from per_token_ce's online softmax against full
logits (one process and vocab-parallel), top-k by entropy, and the exact CVaR weights."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaslm.config import SLMConfig
from megaslm.loss import Objective, compute_objective, per_token_ce

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "distributed"))
from _spawn import run_gloo  # noqa: E402


def _full_entropy(hidden, weight):
    logits = (hidden.double() @ weight.double().t()).float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def _inputs(seed, vocab=203, hidden_size=16, shape=(3, 9), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g) * scale
    weight = torch.randn(vocab, hidden_size, generator=g) / 2
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :2] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size,vocab_block", [(None, None), (4, 17), (1, 203), (5, 1)])
def test_entropy_matches_full_logits(chunk_size, vocab_block):
    hidden, weight, labels = _inputs(0)
    loss, ent = per_token_ce(hidden, weight, labels, chunk_size=chunk_size, vocab_block=vocab_block,
                             with_entropy=True)
    want = _full_entropy(hidden, weight)
    valid = labels != -100
    torch.testing.assert_close(ent[valid], want[valid], rtol=0, atol=1e-5)
    assert (ent[~valid] == 0).all()
    # The loss is the plain call's, bit for bit, and no gradient flows into the entropy.
    assert torch.equal(loss, per_token_ce(hidden, weight, labels, chunk_size=chunk_size, vocab_block=vocab_block))
    assert not ent.requires_grad


def test_entropy_of_peaked_and_flat_rows():
    hidden, weight, labels = _inputs(1, scale=40.0)  # near one-hot softmaxes: entropy close to 0
    _, ent = per_token_ce(hidden, weight, labels, vocab_block=32, with_entropy=True)
    valid = labels != -100
    torch.testing.assert_close(ent[valid], _full_entropy(hidden, weight)[valid], rtol=0, atol=1e-5)
    _, flat = per_token_ce(torch.zeros(1, 2, 16), weight, torch.zeros(1, 2, dtype=torch.long), with_entropy=True)
    torch.testing.assert_close(flat, torch.full((1, 2), math.log(203)), rtol=0, atol=1e-5)


def test_entropy_does_not_change_the_gradient():
    hidden, weight, labels = _inputs(2)
    grads = []
    for with_entropy in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = per_token_ce(h, w, labels, chunk_size=4, vocab_block=32, with_entropy=with_entropy)
        loss = out[0] if with_entropy else out
        loss.sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def _vocab_parallel_entropy(rank, world, vocab):
    hidden, weight, labels = _inputs(3, vocab=vocab)
    shard = torch.tensor_split(weight, world, dim=0)[rank]
    _, ent = per_token_ce(hidden, shard, labels, chunk_size=5, vocab_block=16, tp_group=dist.group.WORLD,
                          with_entropy=True)
    valid = labels != -100
    torch.testing.assert_close(ent[valid], _full_entropy(hidden, weight)[valid], rtol=0, atol=1e-5)
    gathered = [torch.empty_like(ent) for _ in range(world)]
    dist.all_gather(gathered, ent)
    assert all(torch.equal(t, gathered[0]) for t in gathered)


@pytest.mark.parametrize("world,vocab", [(2, 203), (3, 2)])  # (3, 2): the last rank holds an empty shard
def test_vocab_parallel_entropy_matches_full_logits(world, vocab):
    run_gloo(_vocab_parallel_entropy, world, vocab)


def _batch(seed=0, rows=4, cols=10):
    g = torch.Generator().manual_seed(seed)
    token_loss = (torch.rand(rows, cols, generator=g) * 4).requires_grad_()
    entropy = torch.rand(rows, cols, generator=g) * 5
    valid = torch.rand(rows, cols, generator=g) < 0.8
    return token_loss, entropy, valid


def test_entropy_score_keeps_the_top_k_by_entropy():
    token_loss, entropy, valid = _batch()
    loss, stats = compute_objective(token_loss, None, valid,
                                    objective=Objective("slm", scope="global", score="entropy"), ratio=0.3,
                                    head={"entropy": entropy})
    ids = sorted((i for i in range(valid.numel()) if valid.flatten()[i]), key=lambda i: (-entropy.flatten()[i], i))
    k = math.ceil(0.3 * len(ids) - 1e-9)
    chosen = torch.zeros(valid.numel(), dtype=torch.bool)
    chosen[ids[:k]] = True
    expected = token_loss.flatten()[chosen].mean()
    torch.testing.assert_close(loss, expected)
    assert stats["n_selected"] == k and "ref_loss" not in stats
    with pytest.raises(ValueError, match="entropy"):
        compute_objective(token_loss, None, valid, objective=Objective("slm", score="entropy"), ratio=0.3)


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_cvar_weights_sum_to_the_exact_tail_mass(scope):
    token_loss, entropy, valid = _batch(1)
    entropy = entropy.round()  # ties at the threshold
    ratio = 0.35
    loss, _ = compute_objective(token_loss, None, valid,
                                objective=Objective("slm", scope=scope, weighting="cvar", score="entropy",
                                                    slm=SLMConfig(temperature=1.0)),
                                ratio=ratio, head={"entropy": entropy})
    (grad,) = torch.autograd.grad(loss, token_loss)
    mass = ratio * valid.sum().item()
    w = grad * mass  # d loss / d loss_i = w_i / sum(w)
    torch.testing.assert_close(w.sum(), torch.tensor(mass), rtol=1e-5, atol=1e-5)
    groups = [r for r in range(valid.shape[0])] if scope == "sequence" else [slice(None)]
    for r in groups:
        e, v, wr = entropy[r].flatten(), valid[r].flatten(), w[r].flatten()
        n = v.sum().item()
        k = math.ceil(ratio * n - 1e-9)
        if n == 0:
            continue
        t = e[v].sort(descending=True).values[k - 1]
        above, at = v & (e > t), v & (e == t)
        assert torch.allclose(wr[above], torch.ones(()), atol=1e-5)  # the tail above t weighs 1 each
        torch.testing.assert_close(wr[at].sum(), torch.tensor(ratio * n - above.sum().item()), rtol=1e-5,
                                   atol=1e-5)
        assert (wr[v & (e < t)] == 0).all()


def test_cvar_at_ratio_one_is_clm():
    token_loss, entropy, valid = _batch(2)
    clm, _ = compute_objective(token_loss, None, valid, objective=Objective("clm"), ratio=1.0)
    cvar, _ = compute_objective(token_loss, None, valid,
                                objective=Objective("slm", weighting="cvar", score="entropy",
                                                    slm=SLMConfig(temperature=1.0)),
                                ratio=1.0, head={"entropy": entropy})
    torch.testing.assert_close(cvar, clm)


def test_the_loss_head_returns_the_entropy_it_is_asked_for():
    """TokenLossModel(head_outputs=("entropy",)): what the trainer passes through the engine for this score."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megaslm.loss import Objective
    from megaslm.model.build import TokenLossModel

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    model = TokenLossModel(lm, vocab_block=16)
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    obj = Objective("slm", score="entropy", weighting="cvar")
    assert obj.head_outputs == ("entropy",) and not obj.needs_reference
    loss, head = model(ids, labels, head_outputs=obj.head_outputs)
    logits = lm(input_ids=ids).logits.float()
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(head["entropy"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, model(ids, labels), rtol=0, atol=0)
