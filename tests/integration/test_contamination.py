"""`megaslm contamination`: an eval example planted in a corpus is found by its 13-grams; a clean corpus is clean."""

from __future__ import annotations

import json

import pytest

from megaslm.contamination import check, example_index, words
from tests.conftest import run_cli

FILLER = "the derivative of a polynomial is computed term by term using the power rule for each monomial"


def _shards(tmp_path, name, texts, tok):
    from megaslm.data.prepare import prepare

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(src)], tok, str(tmp_path / name))
    return str(tmp_path / name)


def test_planted_example_is_found_and_a_clean_corpus_is_not(tmp_path, tiny_data):
    from megaslm.contamination import task_examples

    examples = task_examples(["arc_easy"], limit=5)
    target = examples["arc_easy"][3]
    planted_words = words(target)[2:15]  # 13 of the example's words, in order, inside other text
    assert len(planted_words) == 13
    planted = _shards(tmp_path, "planted", [FILLER, f"{FILLER}. {' '.join(planted_words)} and more {FILLER}"],
                      tiny_data["tok"])
    res = run_cli("contamination", planted, "--tasks", "arc_easy", "--limit", "5", "--tokenizer", tiny_data["tok"],
                  "--out", str(tmp_path / "c.json"), check=True)
    got = json.loads((tmp_path / "c.json").read_text())
    assert got["tasks"]["arc_easy"]["contaminated"] == 1 and got["tasks"]["arc_easy"]["first"] == [3]
    assert got["hits"][0]["document"] == 1 and got["hits"][0]["ngram"] == " ".join(planted_words)
    assert not got["clean"] and got["documents"] == 2
    assert "arc_easy 1/5" in res.stdout
    # 12 of the words are not a 13-gram: nothing found; the clean corpus of the test data: nothing found
    short = _shards(tmp_path, "short", [f"{FILLER}. {' '.join(planted_words[:12])} and more"], tiny_data["tok"])
    assert check([short], ["arc_easy"], examples={"arc_easy": examples["arc_easy"]},
                 tokenizer=tiny_data["tok"])["clean"]
    clean = check([tiny_data["train"]], ["arc_easy"], examples=examples, tokenizer=tiny_data["tok"])
    assert clean["clean"] and clean["documents"] > 100


def test_text_every_example_shares_is_not_an_example_s_own():
    shared = "answer the following question about science with one of the four choices given below please"
    texts = [f"{shared} question {i} " + " ".join(f"w{i}_{k}" for k in range(15)) for i in range(10)]
    index, own = example_index({"t": texts}, 13)
    assert not any(all(w in shared.split() for w in g) for g in index)  # the preamble's 13-grams are dropped
    assert all(own["t", i] > 0 for i in range(10))


def test_bad_shards_directory_is_one_error_line(tmp_path, capsys):
    from megaslm.cli import main

    assert main(["contamination", str(tmp_path), "--tasks", "arc_easy", "--tokenizer", "x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path}: not a shard directory (no meta.json; make one with `megaslm prepare`)"]


@pytest.mark.parametrize("n", [0])
def test_bad_n_is_refused(n):
    from megaslm.errors import UserError

    with pytest.raises(UserError, match="--n must be >= 1"):
        check([], [], n=n, examples={})
