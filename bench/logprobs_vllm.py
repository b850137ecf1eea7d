"""Per-document token log-probabilities with vLLM's `prompt_logprobs`, for `megaslm score --import` (GPU users).

Every document of the shards (decoded by the shards' tokenizer) is tokenized by the model's own tokenizer and
sent as one prompt [EOS] + document + [EOS] (whole, up to the model's max_model_len; longer documents are cut
into prompts of that length, each prompt's first token context only). vLLM returns, for every prompt token, the
log-probability of that token given the ones before (prompt_logprobs); nothing is generated beyond one token.
Writes {"doc", "text", "spans", "logprobs", "eos_logprob"} per document (megaslm/reference/imported.py). Not run
in megaslm's tests (no GPU there); bench/logprobs_transformers.py is the tested twin.

    python bench/logprobs_vllm.py --model REF_DIR --shards SHARDS --tokenizer SHARDS_TOKENIZER --out lp.jsonl
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer", required=True, help="the tokenizer the shards were prepared with")
    p.add_argument("--out", required=True)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--batch-docs", type=int, default=256)
    a = p.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from megaslm.data.shards import ShardSet
    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.reference.score_docs import document_starts, document_window
    from megaslm.reference.token_bytes import TokenBytes
    from megaslm.reference.xtok import Layout

    llm = LLM(model=a.model, max_model_len=a.max_model_len, enable_prefix_caching=False)
    L = llm.llm_engine.model_config.max_model_len
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    ref = TokenBytes(load_tokenizer(a.model))
    eos = ref.tokenizer.eos_id
    shards = ShardSet(a.shards)
    layout, starts = Layout(load_tokenizer(a.tokenizer)), document_starts(shards)
    with open(a.out, "w") as f:
        for first in range(0, len(starts), a.batch_docs):
            docs = []
            for d in range(first, min(first + a.batch_docs, len(starts))):
                text = layout.segments(document_window(shards, starts, d)[1])[3]
                ids, spans = ref.encode_spans([text], [True])[0] if text else ([], [])
                seq = [eos, *ids, eos]
                pieces = [seq[k:k + L] for k in range(0, len(seq) - 1, L - 1)]  # overlapping by one token
                docs.append((d, text, spans, seq, pieces))
            prompts = [TokensPrompt(prompt_token_ids=pc) for *_, pieces in docs for pc in pieces]
            outs = iter(llm.generate(prompts, params, use_tqdm=False))
            for d, text, spans, seq, pieces in docs:
                lps = []
                for pc in pieces:
                    got = next(outs).prompt_logprobs  # [None, {id: Logprob}, ...]: the first has no context
                    lps.extend(got[i][pc[i]].logprob for i in range(1, len(pc)))
                f.write(json.dumps({"doc": d, "text": text.decode("utf-8"), "spans": [list(map(int, s)) for s in spans],
                                    "logprobs": lps[:-1], "eos_logprob": lps[-1]}) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
