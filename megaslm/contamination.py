"""`megaslm contamination SHARDS... --tasks T1,T2`: does a training corpus contain a benchmark's examples?

An eval example counts as contaminated when one of its word 13-grams (GPT-3's test: lower-cased `\\w+` words,
n configurable) occurs in a document of the shards. That strict test also catches stock phrases ("Express your
answer as a common fraction"), so each example's overlap is reported too: the share of its own n-grams found in
the corpus (an example copied whole has ~1; `mostly` counts those at >= 0.5). An example's text is its prompt and its gold answer as
lm-eval builds them (`doc_to_text` + the target, for multiple choice the gold choice). Text every prompt of a task
shares (a few-shot preamble, a template) is not the example's own: an n-gram found in more than a tenth of a
task's examples (and at least 3) is left out. The shards are decoded with the tokenizer their meta.json names (or
--tokenizer) and split into documents at their recorded boundaries.

Result (printed, and `--out FILE` as JSON):
    {"n": 13, "shards": [...], "documents": D, "words": W, "clean": bool,
     "tasks": {task: {"examples": E, "contaminated": C (any shared n-gram), "first": [example index, ...],
                     "mostly": M (>= half of the example's n-grams found), "max_overlap": largest such share}},
     "hits": [{"task", "example", "shards", "document", "ngram"}, ...]   (the first 20)}
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from megaslm.errors import UserError

WORD = re.compile(r"\w+")
MAX_HITS = 20
NGRAM = 13
MOSTLY = 0.5  # an example with at least this share of its n-grams in the corpus is counted as copied whole


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def task_examples(names: list[str], include_path: list[str] | None = None, limit: int | None = None) -> dict:
    """{task: [example text, ...]} as lm-eval builds each example (prompt + gold answer), first `limit`."""
    from megaslm.eval.tasks import load_tasks

    loaded = load_tasks(names, include_path)
    out = {}
    for name, task in loaded["tasks"].items():
        docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
        texts = []
        for doc in docs:
            target = task.doc_to_target(doc)
            if isinstance(target, int) and task.get_config("doc_to_choice") is not None:
                target = task.doc_to_choice(doc)[target]
            texts.append(f"{task.doc_to_text(doc)} {target}")
        out[name] = texts
    return out


def example_index(examples: dict[str, list[str]], n: int) -> tuple[dict, dict]:
    """(n-gram -> [(task, example)], (task, example) -> its own n-grams' count), without a task's shared text
    (n-grams in > 10% of its examples, and at least 3)."""
    index: dict[tuple, list[tuple[str, int]]] = {}
    own: dict[tuple[str, int], int] = {}
    for task, texts in examples.items():
        seen: dict[tuple, list[int]] = {}
        for i, text in enumerate(texts):
            for g in ngrams(words(text), n):
                seen.setdefault(g, []).append(i)
        shared = max(3, len(texts) // 10)
        for g, idx in seen.items():
            if len(idx) <= shared or len(texts) < 3:
                index.setdefault(g, []).extend((task, i) for i in idx)
                for i in idx:
                    own[task, i] = own.get((task, i), 0) + 1
    return index, own


def shard_texts(path: str, tokenizer: str | None = None):
    """(document number, text) of every document of a shard set, decoded."""
    import numpy as np

    from megaslm.data.shards import ShardSet
    from megaslm.data.tokenizer import load_tokenizer

    meta_file = Path(path) / "meta.json"
    spec = tokenizer or json.loads(meta_file.read_text()).get("tokenizer")
    if not spec:
        raise UserError(f"{path}: its meta.json names no tokenizer: pass --tokenizer")
    tok = load_tokenizer(spec)
    shards = ShardSet(path)
    k = 0
    for i in range(len(shards.meta["shards"])):
        ids = np.asarray(shards._tokens(i))
        starts = list(shards._doc_index(i)[0]) + [len(ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            doc = ids[a:b]
            if len(doc) and doc[-1] == shards.eos_id:
                doc = doc[:-1]
            yield k, tok.decode([int(t) for t in doc])
            k += 1


def check(shard_dirs: list[str], tasks: list[str], n: int = NGRAM, limit: int | None = None,
          include_path: list[str] | None = None, tokenizer: str | None = None, examples: dict | None = None) -> dict:
    """The contamination of `tasks`' examples (or the given {task: [text]}) in `shard_dirs` (module docstring)."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    for d in shard_dirs:  # before lm-eval loads the tasks (seconds): a wrong path fails at once
        if not (Path(d) / "meta.json").is_file():
            raise UserError(f"{d}: not a shard directory (no meta.json; make one with `megaslm prepare`)")
    examples = examples if examples is not None else task_examples(tasks, include_path, limit)
    index, own = example_index(examples, n)
    hit: dict[str, set[int]] = {t: set() for t in examples}
    found: dict[tuple, set] = {}  # (task, example) -> its n-grams seen in the corpus
    hits, docs, n_words = [], 0, 0
    for d in shard_dirs:
        for k, text in shard_texts(d, tokenizer):
            docs += 1
            ws = words(text)
            n_words += len(ws)
            for g in ngrams(ws, n) & index.keys() if len(ws) >= n else ():
                for task, i in index[g]:
                    found.setdefault((task, i), set()).add(g)
                    if i not in hit[task] and len(hits) < MAX_HITS:
                        hits.append({"task": task, "example": i, "shards": d, "document": k, "ngram": " ".join(g)})
                    hit[task].add(i)
    frac = {k: len(v) / own[k] for k, v in found.items()}
    table = {t: {"examples": len(texts), "contaminated": len(hit[t]), "first": sorted(hit[t])[:10],
                 "mostly": sum(1 for (tt, _), f in frac.items() if tt == t and f >= MOSTLY),
                 "max_overlap": round(max([f for (tt, _), f in frac.items() if tt == t], default=0.0), 4)}
             for t, texts in examples.items()}
    return {"n": n, "shards": list(shard_dirs), "documents": docs, "words": n_words,
            "clean": not any(v["contaminated"] for v in table.values()), "tasks": table, "hits": hits}


def summary(res: dict) -> str:
    parts = [f"{t} {v['contaminated']}/{v['examples']} (largest overlap {v['max_overlap']:.2f}, {v['mostly']} at "
             f">= {MOSTLY})" for t, v in res["tasks"].items()]
    verdict = "no eval example shares one" if res["clean"] else "some eval examples share one"
    return (f"{res['n']}-gram overlap of eval examples with {res['documents']} documents ({res['words']} words): "
            f"{verdict}: {'; '.join(parts)}")


def main(a) -> int:
    from megaslm.eval.tasks import parse_tasks

    t0 = time.time()
    res = check(a.shards, parse_tasks(a.tasks), n=a.n, limit=a.limit, include_path=a.include_path,
                tokenizer=a.tokenizer)
    print(summary(res))
    for h in res["hits"][:5]:
        print(f"  {h['task']} example {h['example']}: document {h['document']} of {h['shards']}: \"{h['ngram']}\"")
    if a.out:
        from megaslm.atomic import write_json

        write_json(a.out, res)
    print(f"megaslm contamination: {time.time() - t0:.1f} s" + (f"; results in {a.out}" if a.out else ""),
          file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("contamination", help="do the shards contain eval examples? (13-gram overlap)")
    p.add_argument("shards", nargs="+", help="shard directories (megaslm prepare)")
    p.add_argument("--tasks", required=True, help="comma-separated eval task names (as `megaslm eval`)")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="check the first N examples of each task")
    p.add_argument("--tokenizer", default=None, help="decode the shards with this tokenizer (default: meta.json's)")
    p.add_argument("--include-path", action="append", default=None, help="a directory or YAML of your own tasks")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    p.set_defaults(func=main)
