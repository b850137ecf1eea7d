"""Document masking: per-token losses of a packed batch equal running each document on its own."""

import numpy as np
import pytest
import torch

from megaslm.data.loader import PackedLoader, document_positions
from megaslm.data.shards import ShardWriter
from megaslm.model.build import TokenLossModel, create_model

EOS, VOCAB, L = 2, 512, 48


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Short documents (3-20 tokens) so every window holds several, some cut at the window edges."""
    d = tmp_path_factory.mktemp("docmask") / "s"
    rng = np.random.default_rng(0)
    with ShardWriter(str(d), VOCAB, "f" * 64, EOS, ["x"]) as w:
        for _ in range(200):
            w.add_document(rng.integers(3, VOCAB, size=int(rng.integers(1, 20))), 0)
        w.close()
    return str(d)


def test_positions_restart_after_every_eos():
    ids = np.array([[5, 6, EOS, 7, EOS, EOS, 8, 9], [EOS, 1, 1, 1, 1, 1, 1, 1]])
    assert document_positions(ids, EOS).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_masked_losses_equal_per_document_runs(packed, attn):
    torch.manual_seed(0)
    lm = create_model(preset="tiny", init_from=None, vocab_size=VOCAB, ds_config={}, dtype=torch.float32, eos_id=EOS)
    lm.set_attn_implementation(attn)
    model = TokenLossModel(lm).eval()
    b = PackedLoader(packed, L, 4, document_mask=True).next_batch()
    plain = PackedLoader(packed, L, 4).next_batch()
    assert torch.equal(b["input_ids"], plain["input_ids"])
    # The label after an EOS input (the next document's first token) is dropped; every other label is kept.
    after_eos = b["input_ids"] == EOS
    assert (b["labels"][after_eos] == -100).all() and torch.equal(b["labels"][~after_eos], plain["labels"][~after_eos])
    with torch.no_grad():
        got = model(b["input_ids"], b["labels"], b["position_ids"])
        unmasked = model(b["input_ids"], b["labels"])
        want = torch.zeros_like(got)
        n_docs = 0
        for r in range(b["input_ids"].shape[0]):
            starts = torch.nonzero(b["position_ids"][r] == 0).flatten().tolist() + [L]
            for a, e in zip(starts[:-1], starts[1:]):  # each document (piece) alone, positions from 0
                want[r, a:e] = model(b["input_ids"][r:r + 1, a:e], b["labels"][r:r + 1, a:e])[0]
                n_docs += 1
    assert n_docs > 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (unmasked - want).abs().max() > 1e-3  # without the mask, attention crosses documents
