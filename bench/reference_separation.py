"""Does a reference prefer the tokens you want? Per source of a mixed corpus, the share of tokens that SLM's
top-`ratio` selection would keep, on a sample of training sequences, ranked by:

- `-reference`: the reference's loss alone (low loss = kept): what the reference knows, the model aside;
- `model`: the trained model's own loss alone (what SLM without a reference, or a useless one, would pick);
- `excess`: model loss minus reference loss, per token (Rho-1's score);
- `excess per aligned group` (a reference of another tokenizer only): the excess summed over the smallest byte
  spans where both tokenizations cut (a word split differently by the two), shared equally by that span's tokens;
  it tells whether the per-byte split of straddling reference tokens (docs/score.md) changes the selection.

With another tokenizer and `--model`, a second table gives the kept share by a token's place in its aligned group
(alone in it; the first of a group of several; a later one) and the mean losses there: whether the per-byte split
of a straddling reference token, which gives each part a share in proportion to its bytes, tilts the selection
toward word starts or away from them.

A reference helps SLM on a corpus only as far as `-reference` and `excess` keep more of the wanted source than
`model` does. Reference losses come from a `megaslm score` cache (`--cache`) or are computed here on the sample
(`--reference`, the same path as training: CrossTokenizerReference for another tokenizer), so a candidate
reference can be judged on a few hundred sequences before scoring the whole corpus.

    python bench/reference_separation.py --shards S --tokenizer T --reference R [--cache C] [--model M]
        [--sequences 300] [--seq-len 128] [--ratio 0.6]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM


class _HFLosses:
    """What CrossTokenizerReference calls on its model: per-token losses of a plain Hugging Face model."""

    placement = "one process, no DeepSpeed"

    def __init__(self, path: str):
        self.lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.config = self.lm.config

    @torch.no_grad()
    def losses(self, ids, labels, position_ids=None):
        logits = self.lm(input_ids=ids, position_ids=position_ids).logits.float()
        out = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
        return out * (labels != -100)


def groups(pair, window: np.ndarray) -> np.ndarray:
    """int64 [len(window) - 1]: an aligned-group id per label (window positions 1..): a new group starts at a
    trained token whose first byte is a reference token boundary; each special token is a group of its own."""
    p = pair.plan([window])[0]
    cuts = set(p.ref_spans.reshape(-1).tolist())
    start = np.ones(len(window), bool)  # specials and the first token start groups
    start[p.text_pos] = [a in cuts for a in p.text_spans[:, 0]]
    start[0] = True
    return np.cumsum(start)[1:]


def kept(score: np.ndarray, ratio: float) -> np.ndarray:
    k = math.ceil(ratio * len(score))
    return score >= np.sort(score)[::-1][k - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, help="prepared shards of a mixed corpus (several --input sources)")
    ap.add_argument("--tokenizer", required=True, help="the shards' tokenizer (data.tokenizer)")
    ap.add_argument("--reference", required=True, help="HF model directory of the reference (with its tokenizer)")
    ap.add_argument("--cache", help="a `megaslm score` cache of these shards: read instead of scoring the sample")
    ap.add_argument("--model", help="HF directory of the trained model at some step (for `model` and `excess`)")
    ap.add_argument("--sequences", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from megaslm.data.loader import PackedLoader
    from megaslm.data.shards import ShardSet
    from megaslm.reference.cross import CrossTokenizerReference, tokenizer_pair

    t0 = time.time()
    shards = ShardSet(a.shards)
    pair = tokenizer_pair(a.reference, shards, a.tokenizer, key="--reference")
    loader = PackedLoader(shards, a.seq_len, a.sequences, with_source=True)
    seqs = np.sort(np.random.default_rng(a.seed).choice(loader.n_seq, min(a.sequences, loader.n_seq), replace=False))
    batch = loader.rows(seqs, len(seqs))
    if a.cache:
        from megaslm.reference.cache import CachedReference

        ref = CachedReference(a.cache, shards, a.seq_len).losses_for(batch).numpy()
    else:
        model = _HFLosses(a.reference)
        ref = np.concatenate([
            (CrossTokenizerReference(model, pair).losses_for(b) if pair else
             model.losses(b["input_ids"], b["labels"])).numpy()
            for b in ({k: v[i:i + 8] for k, v in batch.items()} for i in range(0, len(seqs), 8))])
    rows: dict[str, np.ndarray] = {"-reference": -ref}
    if a.model:
        m = _HFLosses(a.model)
        own = np.concatenate([m.losses(batch["input_ids"][i:i + 8], batch["labels"][i:i + 8]).numpy()
                              for i in range(0, len(seqs), 8)])
        rows["model"], rows["excess"] = own, own - ref
        if pair:
            ex = own - ref
            g = np.stack([groups(pair, np.r_[batch["input_ids"][r].numpy(), batch["labels"][r, -1].item()])
                          + r * (a.seq_len + 2) for r in range(len(seqs))])
            _, inv, cnt = np.unique(g.reshape(-1), return_inverse=True, return_counts=True)
            rows["excess per aligned group"] = (np.bincount(inv, weights=ex.reshape(-1)) / cnt)[inv].reshape(ex.shape)
            size = cnt[inv].reshape(g.shape)
            first = np.ones_like(g, bool)
            first[:, 1:] = g[:, 1:] != g[:, :-1]
            places = {"alone in its group": size == 1, "first of a group": (size > 1) & first,
                      "later in a group": (size > 1) & ~first}
    valid = batch["labels"].numpy() != -100
    source = batch["source"].numpy()[valid]
    names = shards.sources
    print(f"{valid.sum()} tokens of {len(seqs)} sequences; reference {a.reference} "
          f"({'another tokenizer' if pair else 'same tokenizer'}); ratio {a.ratio}; {time.time() - t0:.0f} s")
    print(f"{'ranked by':<26}" + "".join(f"{n.split('/')[-1][:24]:>26}" for n in names))
    print(f"{'(share of tokens)':<26}" + "".join(f"{(source == s).mean():>26.3f}" for s in range(len(names))))
    sel = {}  # name: which valid tokens its ranking keeps
    for name, score in rows.items():
        sel[name] = kept(score[valid], a.ratio)
        print(f"{name:<26}" + "".join(f"{sel[name][source == s].mean():>26.3f}" for s in range(len(names))))
    if a.model and pair:
        print(f"\n{'by place in the group':<26}{'share':>8}{'model':>8}{'ref':>8}" + "".join(
            f"{n:>12}" for n in ("kept:model", "kept:excess", "kept:group")))
        for place, m in places.items():
            mv = m[valid]
            print(f"{place:<26}{mv.mean():>8.3f}{own[m & valid].mean():>8.3f}{ref[m & valid].mean():>8.3f}" + "".join(
                f"{sel[n][mv].mean():>12.3f}" for n in ("model", "excess", "excess per aligned group")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
