"""A window of the trained model's tokens as the reference model's token sequence, and its losses carried back.

What the reference sees (docs/score.md, "A reference with another tokenizer"): the window's own bytes, in order,
its first token as context. Concretely, `CrossTokenizer.plan(window)`:
- lays the window's tokens on bytes (token_bytes.py). Special tokens (EOS between documents) have no bytes; the
  trained tokenizer's dummy-prefix space of a document's first token (after an EOS) is dropped, as decoding
  does, since it is not in the text;
- cuts the bytes into segments: after the window's first token (context only in training too: cutting there
  lets every label byte be predicted by a reference token that starts inside the labels), and around each
  special token. An incomplete UTF-8 character at a segment's ends (a window that starts or ends inside a
  character spelled by byte-fallback tokens) is not shown to the reference;
- tokenizes each segment with the reference's tokenizer (a SentencePiece reference adds its dummy-prefix space
  only to a segment that starts a document, after an EOS) and joins them, a special token becoming the
  reference's EOS. The reference predicts this whole sequence causally (context: everything before in the
  window, across documents as the trained model sees a packed window).
`carry(plan, losses)` then gives each window token its share (align.py's rule); a special token gets exactly
the loss of the reference's EOS that stands for it; the window's first token gets 0 (it is not a label).

`megaslm score` and imported files use the same plan on each document with the previous EOS before it
(`document_window`): the reference sees the document from its start, preceded by its EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megaslm.reference.align import carry, spans_of_lengths
from megaslm.reference.token_bytes import TokenBytes


@dataclass
class Plan:
    ref_ids: list[int]  # the reference's tokens for the window; ref_ids[0] is context only
    text_pos: np.ndarray  # window positions of the tokens with bytes
    text_spans: np.ndarray  # [len(text_pos), 2]: their byte spans in the window's bytes
    special_pos: np.ndarray  # window positions of special tokens
    special_ref: np.ndarray  # index in ref_ids of the reference EOS standing for each
    ref_text: np.ndarray  # index in ref_ids of each reference token with bytes
    ref_spans: np.ndarray  # [len(ref_text), 2]: their byte spans in the window's bytes
    window_bytes: bytes  # the window's bytes (what the spans index)


def usable_utf8(b: bytes) -> tuple[int, int]:
    """[lo, hi) of `b` without a cut character at either end; (0, 0) when the middle is not UTF-8 either."""
    lo = 0
    while lo < min(3, len(b)) and (b[lo] & 0xC0) == 0x80:
        lo += 1
    for cut in range(4):
        try:
            b[lo:len(b) - cut].decode("utf-8")
            return lo, len(b) - cut
        except UnicodeDecodeError:
            continue
    return 0, 0


class Layout:
    """The trained tokenizer's side: a window of its token ids laid on bytes (see the module docstring)."""

    def __init__(self, trained):
        self.trained = trained if isinstance(trained, TokenBytes) else TokenBytes(trained)
        self._space_first = np.array([b is not None and b[:1] == b" " for b in self.trained.table], bool)

    def segments(self, w: np.ndarray):
        """(positions of text tokens, segments in order, their byte spans). A segment is a special token's window
        position, or (window bytes, lo, hi, starts a document): the usable bytes [lo, hi) of a run of text tokens."""
        t = self.trained
        lengths = t.lengths[w].copy()
        special = lengths < 0
        strip = np.zeros(len(w), bool)
        if t.dummy_prefix and len(w) > 1:  # a document's first token: its dummy space is not in the text
            strip[1:] = special[:-1] & self._space_first[w[1:]]
        lengths[strip] -= 1
        text_pos = np.nonzero(~special)[0]
        spans = spans_of_lengths(lengths[text_pos])
        pieces = [t.table[i] for i in w[text_pos]]
        for k in np.nonzero(strip[text_pos])[0]:
            pieces[k] = pieces[k][1:]
        wb = b"".join(pieces)
        start_of = np.zeros(len(w), np.int64)
        start_of[text_pos] = spans[:, 0]
        segs, j = [], 0
        while j < len(w):
            if special[j]:
                segs.append(int(j))
                j += 1
                continue
            k = j + 1
            while k < len(w) and not special[k] and k != 1:  # cut after the first token, and at specials
                k += 1
            a = int(start_of[j])
            b = int(spans[np.searchsorted(text_pos, k - 1), 1])
            lo, hi = usable_utf8(wb[a:b])
            segs.append((wb, a + lo, a + hi, bool(j > 0 and special[j - 1])))
            j = k
        return text_pos, segs, spans, wb


class CrossTokenizer:
    """Plans windows of `trained` token ids as `reference` token sequences and carries the losses back."""

    def __init__(self, trained, reference):
        self.layout = trained if isinstance(trained, Layout) else Layout(trained)
        self.trained = self.layout.trained
        self.reference = reference if isinstance(reference, TokenBytes) else TokenBytes(reference)
        self.ref_eos = int(self.reference.tokenizer.eos_id)

    def plan(self, windows: list[np.ndarray]) -> list[Plan]:
        """One Plan per window (int arrays of trained token ids); the segments of all windows are tokenized in
        one batch."""
        parts = [self.layout.segments(np.asarray(w, np.int64)) for w in windows]
        texts = [seg for _, segs, _, _ in parts for seg in segs if isinstance(seg, tuple) and seg[2] > seg[1]]
        # A segment starts a document when it follows a special token (EOS).
        encoded = iter(self.reference.encode_spans([wb[a:b] for wb, a, b, _ in texts],
                                                   [start for *_, start in texts]))
        plans = []
        for text_pos, segs, spans, wb in parts:
            ref_ids, ref_text, ref_spans, special_pos, special_ref = [], [], [], [], []
            for seg in segs:
                if not isinstance(seg, tuple):  # a special token at window position seg
                    special_pos.append(seg)
                    special_ref.append(len(ref_ids))
                    ref_ids.append(self.ref_eos)
                    continue
                _, a, b, _ = seg
                if b <= a:
                    continue
                ids, sp = next(encoded)
                ref_text.extend(range(len(ref_ids), len(ref_ids) + len(ids)))
                ref_spans.append(sp + a)
                ref_ids.extend(ids)
            plans.append(Plan(ref_ids, text_pos, spans, np.array(special_pos, np.int64),
                              np.array(special_ref, np.int64), np.array(ref_text, np.int64),
                              np.concatenate(ref_spans) if ref_spans else np.zeros((0, 2), np.int64), wb))
        return plans

    def carry(self, plan: Plan, ref_losses: np.ndarray, n: int) -> np.ndarray:
        """float64 [n]: the carried loss of each of the window's n tokens. ref_losses[k]: the reference's loss of
        ref_ids[k] given ref_ids[:k] (ref_losses[0] is ignored: nothing predicts the first token)."""
        losses = np.asarray(ref_losses, np.float64).copy()
        losses[:1] = 0.0
        out = np.zeros(n, np.float64)
        out[plan.text_pos] = carry(plan.text_spans, plan.ref_spans, losses[plan.ref_text])
        out[plan.special_pos] = losses[plan.special_ref]
        out[0] = 0.0
        return out
