"""Carrying reference losses across tokenizers by bytes (megaslm/reference/align.py, xtok.py)."""

from __future__ import annotations

import numpy as np
import pytest

from megaslm.reference.align import carry


def test_carry_splits_straddling_tokens_by_bytes_and_keeps_whole_ones_exact():
    trained = np.array([[0, 3], [3, 5], [5, 5], [5, 9]])
    ref = np.array([[0, 3], [3, 7], [5, 5], [7, 9], [9, 9]])
    losses = np.array([1.5, 2.0, 0.3, 0.4, 0.7])
    out = carry(trained, ref, losses)
    # [3,7) straddles 5: 2 bytes each side; the zero-width token at 5 goes to the zero-width trained token there;
    # the one at the end to the last token.
    assert out.tolist() == [1.5, 1.0, 0.3, 1.0 + 0.4 + 0.7]
    assert out.sum() == pytest.approx(losses.sum(), rel=1e-15)


def _stream(tiny_data):
    from megaslm.data.shards import ShardSet

    s = ShardSet(tiny_data["train"])
    return s.read(0, min(s.num_tokens, 60_000)).astype(np.int64), s.eos_id


@pytest.mark.parametrize("which", ["byte_level_bpe", "sentencepiece"])
def test_documents_carry_the_reference_total_and_whole_tokens_exactly(tiny_data, byte_level_bpe, which):
    """Per document ([EOS] + document + EOS, as `megaslm score` plans it): the window's bytes are the document's
    text, the carried losses sum to the reference's total, a trained token that is exactly one reference token
    gets exactly its loss, and the EOS gets the reference EOS's loss."""
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.xtok import CrossTokenizer

    trained = load_tokenizer(str(tiny_data["tok"]))
    ref = load_tokenizer(byte_level_bpe if which == "byte_level_bpe" else str(tiny_data["root"] / "tok_other"))
    x = CrossTokenizer(trained, ref)
    stream, eos = _stream(tiny_data)
    ends = np.nonzero(stream == eos)[0][:40]
    starts = np.concatenate([[0], ends[:-1] + 1])
    windows = [np.concatenate([[eos], stream[a:b + 1]]) for a, b in zip(starts, ends)]
    rng = np.random.default_rng(0)
    worst, n_whole = 0.0, 0
    for w, plan in zip(windows, x.plan(windows)):
        assert plan.window_bytes == trained.decode(w[1:-1]).encode()
        assert plan.ref_ids[0] == plan.ref_ids[-1] == ref.eos_id
        losses = rng.random(len(plan.ref_ids)) * 4
        out = x.carry(plan, losses, len(w))
        worst = max(worst, abs(out.sum() - losses[1:].sum()) / losses[1:].sum())
        assert out[-1] == losses[-1] and out[0] == 0
        zero_width_at = {int(a) for a, b in plan.ref_spans if a == b}
        whole = {(int(a), int(b)): k for (a, b), k in zip(plan.ref_spans, plan.ref_text)}
        for pos, (a, b) in zip(plan.text_pos, plan.text_spans):
            k = whole.get((int(a), int(b)))
            if k is not None and b > a and int(a) not in zero_width_at:
                assert out[pos] == losses[k]
                n_whole += 1
    assert worst < 1e-12 and n_whole > 1000, (worst, n_whole)


def test_windows_score_every_label_byte(tiny_data, byte_level_bpe):
    """Training windows start and end mid-document: the first token is context only (carries 0), and what the
    labels carry is the reference's loss of every reference token after the window's first token."""
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.xtok import CrossTokenizer

    x = CrossTokenizer(load_tokenizer(str(tiny_data["tok"])), load_tokenizer(byte_level_bpe))
    stream, _ = _stream(tiny_data)
    T = 32
    windows = [stream[i * T:i * T + T + 1] for i in range(300)]
    rng = np.random.default_rng(1)
    for w, plan in zip(windows, x.plan(windows)):
        losses = rng.random(len(plan.ref_ids))
        out = x.carry(plan, losses, len(w))
        first_end = plan.text_spans[0, 1] if len(plan.text_pos) and plan.text_pos[0] == 0 else 0
        after = [k for (a, b), k in zip(plan.ref_spans, plan.ref_text) if a >= first_end and k > 0]
        after += [k for k in plan.special_ref if k > 0]
        assert out[0] == 0 and out[1:].sum() == pytest.approx(losses[after].sum(), rel=1e-12)
