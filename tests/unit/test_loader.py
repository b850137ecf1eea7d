import numpy as np
import pytest
import torch

from megaslm.data.loader import PackedLoader
from megaslm.data.shards import ShardSet, ShardWriter
from megaslm.errors import UserError

EOS = 0
VOCAB = 70000  # uint32 storage, so the token stream below can simply count up


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Documents whose token ids are their global positions (EOS = 0 at document ends), split over several
    files, from 3 sources. Returns (dir, stream, per-token source) computed without the library."""
    d = tmp_path_factory.mktemp("shards") / "s"
    rng = np.random.default_rng(0)
    stream, source = [], []
    with ShardWriter(str(d), VOCAB, "f" * 64, EOS, ["x", "y", "z"], max_tokens_per_shard=300) as w:
        pos = 0
        while pos < 2000:
            n = int(rng.integers(1, 50))
            src = int(rng.integers(0, 3))
            ids = np.arange(pos + 1, pos + n + 1)  # position+1 so no id collides with EOS
            w.add_document(ids, src)
            stream += list(ids) + [EOS]
            source += [src] * (n + 1)
            pos += n + 1
        w.close()
    return str(d), np.array(stream), np.array(source)


def window(stream, i, L):
    return stream[i * L:i * L + L + 1]


def test_packing_math(shard_dir):
    d, stream, source = shard_dir
    L, B = 16, 4
    loader = PackedLoader(d, L, B, seed=3, with_source=True)
    assert loader.n_seq == (len(stream) - 1) // L
    perm = np.random.default_rng([3, 0]).permutation(loader.n_seq)
    for step in range(3):
        b = loader.next_batch()
        assert set(b) == {"input_ids", "labels", "index", "source"}
        assert all(t.dtype == torch.long for t in b.values())
        assert b["input_ids"].shape == b["labels"].shape == b["source"].shape == (B, L)
        idx = perm[step * B:(step + 1) * B]
        assert b["index"].tolist() == idx.tolist()
        for row, i in enumerate(idx):
            w = window(stream, i, L)
            assert b["input_ids"][row].tolist() == w[:-1].tolist()
            assert b["labels"][row].tolist() == w[1:].tolist()
            assert b["source"][row].tolist() == source[i * L + 1:i * L + L + 1].tolist()


def test_ranks_split_one_global_batch(shard_dir):
    d, stream, _ = shard_dir
    L, B, dp = 8, 3, 4
    ranks = [PackedLoader(d, L, B, dp_rank=r, dp_size=dp, seed=1) for r in range(dp)]
    full = PackedLoader(d, L, B * dp, seed=1)
    steps = full.steps_per_epoch
    seen = []
    for _ in range(steps):
        parts = [r.next_batch() for r in ranks]
        ref = full.next_batch()
        for k in ("input_ids", "labels", "index"):
            assert torch.equal(torch.cat([p[k] for p in parts]), ref[k])
        seen += torch.cat([p["index"] for p in parts]).tolist()
    # One epoch: every rank got different sequences, all from the epoch's permutation, remainder dropped.
    assert len(seen) == len(set(seen)) == steps * B * dp
    perm = np.random.default_rng([1, 0]).permutation(full.n_seq)
    assert seen == perm[:steps * B * dp].tolist()


def test_dp2_b4_equals_dp1_b8_across_epochs(shard_dir):
    d, _, _ = shard_dir
    one = PackedLoader(d, 32, 8, seed=7)
    two = [PackedLoader(d, 32, 4, dp_rank=r, dp_size=2, seed=7) for r in range(2)]
    for _ in range(2 * one.steps_per_epoch + 3):
        a = one.next_batch()
        b0, b1 = (t.next_batch() for t in two)
        assert torch.equal(a["input_ids"][:4], b0["input_ids"]) and torch.equal(a["input_ids"][4:], b1["input_ids"])
        assert torch.equal(a["labels"], torch.cat([b0["labels"], b1["labels"]]))
    assert one.epoch == two[0].epoch == 2


def test_epoch_rollover(shard_dir):
    d, _, _ = shard_dir
    loader = PackedLoader(d, 16, 5, seed=2)
    n, G = loader.n_seq, 5
    assert n % G != 0  # so a remainder is really dropped
    for _ in range(n // G):
        loader.next_batch()
    assert loader.epoch == 0
    b = loader.next_batch()
    assert loader.epoch == 1
    assert b["index"].tolist() == np.random.default_rng([2, 1]).permutation(n)[:G].tolist()
    # Different seeds give different orders.
    other = PackedLoader(d, 16, 5, seed=3).next_batch()
    assert other["index"].tolist() != PackedLoader(d, 16, 5, seed=2).next_batch()["index"].tolist()


@pytest.mark.parametrize("k", [3, 18])  # saved in epoch 0 / epoch 1; either way the 20 batches after it cross
                                       # an epoch end (an epoch here is n_seq // 8 = 15 global batches)
def test_resume_equals_uninterrupted(shard_dir, k):
    d, _, _ = shard_dir
    ref = PackedLoader(d, 16, 4, dp_rank=1, dp_size=2, seed=5, with_source=True)
    for _ in range(k):
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(20)]
    resumed = PackedLoader(ShardSet(d), 16, 4, dp_rank=1, dp_size=2, seed=5, with_source=True)
    resumed.load_state_dict(state)
    for e in expected:
        got = resumed.next_batch()
        for key in e:
            assert torch.equal(got[key], e[key])
    assert ref.steps_per_epoch == 15 and ref.epoch == (k + 20) // 15
    # The same state resumes with another data-parallel layout of the same global batch.
    flat = PackedLoader(d, 16, 8, seed=5, with_source=True)
    flat.load_state_dict(state)
    assert torch.equal(flat.next_batch()["input_ids"][4:], expected[0]["input_ids"])


def test_state_mismatch_errors(shard_dir, tmp_path):
    d, _, _ = shard_dir
    state = PackedLoader(d, 16, 4, dp_size=2, seed=5).state_dict()
    with pytest.raises(UserError, match="seq_len 16 in the saved state vs 32 now"):
        PackedLoader(d, 32, 4, dp_size=2, seed=5).load_state_dict(state)
    with pytest.raises(UserError, match="seed 5 in the saved state vs 6 now"):
        PackedLoader(d, 16, 4, dp_size=2, seed=6).load_state_dict(state)
    smaller = PackedLoader(d, 16, 4, dp_size=1, seed=5)  # another step batch: allowed, and said
    smaller.load_state_dict(state)
    assert smaller.step_batch_change == (8, 4) and smaller.pos == state["pos"]
    other = tmp_path / "other"
    with ShardWriter(str(other), VOCAB, "e" * 64, EOS, ["x"]) as w:
        w.add_document(np.arange(1, 500), 0)
        w.close()
    with pytest.raises(UserError, match="num_tokens.*fingerprint"):
        PackedLoader(str(other), 16, 4, dp_size=2, seed=5).load_state_dict(state)


def test_too_small_for_a_global_batch(tmp_path):
    d = tmp_path / "tiny"
    with ShardWriter(str(d), 1000, "f", EOS, ["x"]) as w:
        w.add_document(np.arange(1, 100), 0)  # 100 tokens: 6 sequences of 16
        w.close()
    with pytest.raises(UserError, match=r"tiny hold 100 tokens.*needs 129 tokens"):
        PackedLoader(str(d), 16, 4, dp_size=2)
    assert PackedLoader(str(d), 16, 3, dp_size=2).n_seq == 6


def test_eval_batches_in_order_and_padded(shard_dir):
    d, stream, _ = shard_dir
    L, B, dp = 16, 4, 2
    ranks = [PackedLoader(d, L, B, dp_rank=r, dp_size=dp, with_source=True) for r in range(dp)]
    m = 21  # 2 full global batches of 8, then 5 sequences: rank 0 gets 4, rank 1 gets 1 + 3 padding rows
    outs = [list(r.eval_batches(max_sequences=m)) for r in ranks]
    assert [len(o) for o in outs] == [3, 3] == [ranks[0].num_eval_batches(m)] * 2
    order = []
    for g in range(3):
        for r in range(dp):
            b = outs[r][g]
            for row in range(B):
                i = int(b["index"][row])
                if i < 0:
                    assert (b["labels"][row] == -100).all() and (b["source"][row] == -1).all()
                    continue
                order.append(i)
                assert b["input_ids"][row].tolist() == window(stream, i, L)[:-1].tolist()
                assert b["labels"][row].tolist() == window(stream, i, L)[1:].tolist()
    assert order == list(range(m))
    assert sum(int((o[-1]["labels"] != -100).all(dim=1).sum()) for o in outs) == 5
    # Evaluation does not move the training position, and covers everything when unbounded.
    assert ranks[0].state_dict()["pos"] == 0
    assert sum(len(b["index"]) for b in ranks[0].eval_batches()) == B * ranks[0].num_eval_batches()


def test_resume_on_the_same_documents_in_another_order_names_the_shard(shard_dir, tmp_path):
    """Same token and document counts, other content: the loader state's content hashes refuse it."""
    d, _, _ = shard_dir
    state = PackedLoader(d, 16, 4, dp_size=2, seed=5).state_dict()
    src = ShardSet(d)
    docs = [src.read(a, b) for a, b in zip(*document_bounds(src))]
    other = tmp_path / "reordered"
    with ShardWriter(str(other), VOCAB, "f" * 64, EOS, ["x", "y", "z"], max_tokens_per_shard=300) as w:
        for doc in reversed(docs):
            w.add_document(doc[:-1], 0)
        w.close()
    again = ShardSet(str(other))
    assert (again.num_tokens, again.num_documents) == (src.num_tokens, src.num_documents)
    with pytest.raises(UserError) as e:
        PackedLoader(str(other), 16, 4, dp_size=2, seed=5).load_state_dict(state)
    print(e.value)
    assert str(e.value).startswith(f"cannot resume the data loader: shard file {other}/tokens_00000.bin holds other "
                                   f"content than the data this was made from (content hash ")


def document_bounds(shards):
    """(starts, ends) of every document in the stream, from its EOS tokens (independent of the index files)."""
    stream = shards.read(0, shards.num_tokens)
    ends = np.flatnonzero(stream == EOS) + 1
    return np.concatenate([[0], ends[:-1]]), ends


def _step_sets(layouts, steps):
    """Per layout (dp_size, micro_batch_size, grad_accum): the sorted sequence numbers of each optimizer step."""
    out = []
    for dp, B, accum, d in layouts:
        ranks = [PackedLoader(d, 16, B, dp_rank=r, dp_size=dp, seed=7, grad_accum=accum) for r in range(dp)]
        out.append([sorted(int(i) for ld in ranks for _ in range(accum) for i in ld.next_batch()["index"])
                    for _ in range(steps)])
    return out


def test_every_layout_of_one_step_batch_reads_the_same_steps(shard_dir):
    """dp x micro-batch x grad_accum = 12 sequences per step, over 3 epochs (an epoch is 125 // 12 = 10 steps):
    every layout's optimizer steps hold the same sequences, also across the epoch ends."""
    d, _, _ = shard_dir
    n = PackedLoader(d, 16, 1).n_seq
    assert n % 12 != 0  # a remainder is dropped at each epoch end: the layouts must drop the same one
    steps = 3 * (n // 12) + 2
    first, *others = _step_sets([(1, 12, 1, d), (2, 3, 2, d), (3, 2, 2, d), (4, 1, 3, d), (1, 1, 12, d)], steps)
    assert all(o == first for o in others)
    assert len({i for s in first[:n // 12] for i in s}) == 12 * (n // 12)  # an epoch: no sequence twice


def test_resume_on_another_layout_continues_the_global_order(shard_dir):
    d, _, _ = shard_dir
    two = [PackedLoader(d, 16, 2, dp_rank=r, dp_size=2, seed=7, grad_accum=2) for r in range(2)]
    for _ in range(2 * 25):  # 25 steps of 2 micro-batches: into the third epoch
        for ld in two:
            ld.next_batch()
    state = two[0].state_dict()
    want = [sorted(int(i) for ld in two for _ in range(2) for i in ld.next_batch()["index"]) for _ in range(12)]
    one = PackedLoader(d, 16, 8, seed=7)  # 1 rank, 8 sequences a micro-batch, no accumulation
    one.load_state_dict(state)
    assert one.step_batch_change is None
    assert [sorted(int(i) for i in one.next_batch()["index"]) for _ in range(12)] == want
