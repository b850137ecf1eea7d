"""Per-document token log-probabilities of a reference model with transformers, for `megaslm score --import`.

Every document of the shards (decoded by the shards' tokenizer) is tokenized by the model's own tokenizer and
scored as [EOS] + document + [EOS] (the EOS before it: the previous document's end) in blocks of --block-tokens
predictions, each block seeing only its own tokens before (as `megaslm score` does with a reference of another
tokenizer: give train.seq_len to get the same cache). Writes one JSONL record per document:
{"doc", "text", "spans" (byte spans of the model's tokens), "logprobs", "eos_logprob"} (format:
megaslm/reference/imported.py).

    python bench/logprobs_transformers.py --model REF_DIR --shards SHARDS --tokenizer SHARDS_TOKENIZER \
        --block-tokens 256 --out logprobs.jsonl [--docs N]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face directory of the reference (with its tokenizer)")
    p.add_argument("--shards", required=True, help="shard directory written by `megaslm prepare`")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the shards were prepared with")
    p.add_argument("--block-tokens", type=int, required=True, help="predictions per forward (train.seq_len)")
    p.add_argument("--out", required=True)
    p.add_argument("--docs", type=int, default=None, help="only the first N documents")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.data.shards import ShardSet
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.score_docs import document_starts, document_window
    from megaslm.reference.token_bytes import TokenBytes
    from megaslm.reference.xtok import Layout

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    ref = TokenBytes(load_tokenizer(a.model))
    eos = ref.tokenizer.eos_id
    shards = ShardSet(a.shards)
    layout, starts = Layout(load_tokenizer(a.tokenizer)), document_starts(shards)
    T = a.block_tokens
    with open(a.out, "w") as f, torch.no_grad():
        for d in range(len(starts) if a.docs is None else min(a.docs, len(starts))):
            text = layout.segments(document_window(shards, starts, d)[1])[3]
            ids, spans = ref.encode_spans([text], [True])[0] if text else ([], [])
            seq = [eos, *ids, eos]
            logprobs = []
            for k in range(0, len(seq) - 1, T):  # block: seq[k : k+T+1], predicting seq[k+1 : k+T+1]
                block = torch.tensor([seq[k:k + T + 1]])
                logits = model(block[:, :-1]).logits.float()
                lp = torch.log_softmax(logits, dim=-1)[0].gather(1, block[0, 1:, None])[:, 0]
                logprobs.extend(lp.tolist())
            f.write(json.dumps({"doc": d, "text": text.decode("utf-8"), "spans": [list(map(int, s)) for s in spans],
                                "logprobs": logprobs[:-1], "eos_logprob": logprobs[-1]}) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
