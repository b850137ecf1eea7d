import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaslm.data.prepare import prepare
from megaslm.data.shards import ShardSet
from megaslm.data.tokenizer import load_tokenizer, train_tokenizer
from megaslm.errors import UserError

WORDS = ("the of and graph matrix integral function returns node edge symbol value prime series sum root "
         "polynomial derivative limit vector space field group ring order degree").split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n)).capitalize() + "."


def make_docs(n, seed):
    rng = np.random.default_rng(seed)
    return [f"Doc {seed}-{i}: " + " ".join(sentence(rng, int(rng.integers(3, 12))) for _ in range(rng.integers(1, 5)))
            for i in range(n)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text("\n\n".join(make_docs(400, 99)) + "\n\nUnicode: é ü 日本 😀 ½\n")
    return train_tokenizer([str(d / "train.txt")], 400, str(d / "tok"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One file of every supported kind, and the documents prepare should find in each."""
    d = tmp_path_factory.mktemp("in")
    expected = {}
    paras = make_docs(12, 1)
    # txt: blank lines separate documents; runs of blank lines and surrounding newlines do not matter.
    (d / "a.txt").write_text("\n\n".join(paras[:6]) + "\n\n\n\n" + "\n\n".join(paras[6:]) + "\n")
    expected["a.txt"] = paras
    docs = make_docs(30, 2)
    with open(d / "b.jsonl", "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
        f.write(json.dumps({"id": 99, "text": ""}) + "\n")  # empty documents are skipped
    expected["b.jsonl"] = docs
    docs = make_docs(25, 3)
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    expected["c.jsonl.gz"] = docs
    docs = make_docs(40, 4)
    pq.write_table(pa.table({"text": docs, "n": list(range(40))}), d / "d.parquet", row_group_size=7)
    expected["d.parquet"] = docs
    docs = make_docs(5, 5)
    with gzip.open(d / "e[1].txt.gz", "wt") as f:
        f.write("\n\n".join(docs))
    expected["e[1].txt.gz"] = docs
    docs = make_docs(4, 6)
    (d / "f.json").write_text(json.dumps([{"text": t} for t in docs]))
    expected["f.json"] = docs
    return d, expected


def expected_stream(tok, files, expected):
    toks, srcs = [], []
    for i, name in enumerate(files):
        for ids in tok.encode_batch(expected[name]):
            toks += ids + [tok.eos_id]
            srcs += [i] * (len(ids) + 1)
    return np.array(toks), np.array(srcs)


def test_every_format_gives_the_tokenizer_ids(tmp_path, tok_dir, inputs):
    d, expected = inputs
    names = ["a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet", "e[1].txt.gz", "f.json"]
    meta = prepare([str(d / n) for n in names], tok_dir, str(tmp_path / "out"), batch_docs=8)
    tok = load_tokenizer(tok_dir)
    toks, srcs = expected_stream(tok, names, expected)
    s = ShardSet(str(tmp_path / "out"))
    assert meta == s.meta
    assert s.sources == [str(d / n) for n in names]
    assert (s.vocab_size, s.eos_id, s.fingerprint) == (400, tok.eos_id, tok.fingerprint)
    assert s.meta["source_documents"] == [len(expected[n]) for n in names]
    np.testing.assert_array_equal(s.read(0, s.num_tokens), toks)
    np.testing.assert_array_equal(s.source_of_tokens(0, s.num_tokens), srcs)


def test_num_proc_2_is_identical_and_shards_split(tmp_path, tok_dir, inputs):
    d, expected = inputs
    outs = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        prepare([str(d)], tok_dir, str(out), num_proc=n, max_tokens_per_shard=500, batch_docs=3)
        outs.append(out)
    a, b = ShardSet(str(outs[0])), ShardSet(str(outs[1]))
    assert len(a.meta["shards"]) > 3
    # A directory input contributes its supported files, sorted.
    assert a.sources == [str(d / n) for n in sorted(expected)]
    assert {k: v for k, v in a.meta.items() if k != "created"} == {k: v for k, v in b.meta.items() if k != "created"}
    for sh in a.meta["shards"]:
        for key in ("file", "docs_file"):
            assert (outs[0] / sh[key]).read_bytes() == (outs[1] / sh[key]).read_bytes()
    toks, srcs = expected_stream(load_tokenizer(tok_dir), sorted(expected), expected)
    np.testing.assert_array_equal(b.read(0, b.num_tokens), toks)


def test_bad_inputs_name_the_path(tmp_path, tok_dir, inputs):
    d, _ = inputs
    with pytest.raises(UserError, match="missing.jsonl"):
        prepare([str(d / "b.jsonl"), str(tmp_path / "missing.jsonl")], tok_dir, str(tmp_path / "o"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"x\.csv.*unsupported"):
        prepare([str(tmp_path / "x.csv")], tok_dir, str(tmp_path / "o"))
    with pytest.raises(UserError, match=r"b\.jsonl.*'body'"):
        prepare([str(d / "b.jsonl")], tok_dir, str(tmp_path / "o"), text_field="body")
    with pytest.raises(UserError, match=r"d\.parquet.*'body'"):
        prepare([str(d / "d.parquet")], tok_dir, str(tmp_path / "o"), text_field="body")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": unquoted}\n')
    with pytest.raises(UserError, match=r"broken\.jsonl"):
        prepare([str(tmp_path / "broken.jsonl")], tok_dir, str(tmp_path / "o"))
    with pytest.raises(UserError, match="nope"):
        prepare([str(d / "b.jsonl")], str(tmp_path / "nope"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_failure_midway_keeps_the_old_set(tmp_path, tok_dir, inputs):
    d, expected = inputs
    out = tmp_path / "out"
    prepare([str(d / "b.jsonl")], tok_dir, str(out))
    before = ShardSet(str(out)).read(0, ShardSet(str(out)).num_tokens)
    # The second input lacks the field: the first was already tokenized and written when this fails.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    for num_proc in (1, 2):
        with pytest.raises(UserError, match=r"bad\.jsonl.*'text'"):
            prepare([str(d / "c.jsonl.gz"), str(tmp_path / "bad.jsonl")], tok_dir, str(out), num_proc=num_proc)
        s = ShardSet(str(out))
        assert s.sources == [str(d / "b.jsonl")]
        np.testing.assert_array_equal(s.read(0, s.num_tokens), before)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("out")) == ["out"]


def test_killed_prepare_keeps_the_old_set(tmp_path, tok_dir, inputs):
    """SIGKILL at the worst moment: the new set is complete (meta.json written) but not yet swapped in."""
    d, _ = inputs
    out = tmp_path / "out"
    prepare([str(d / "b.jsonl")], tok_dir, str(out))
    old = ShardSet(str(out))
    before = old.read(0, old.num_tokens)
    script = (
        "import os, signal\n"
        "from megaslm.data import prepare, shards\n"
        "shards.ShardWriter._swap_in = lambda self: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"prepare.prepare([{str(d / 'c.jsonl.gz')!r}], {tok_dir!r}, {str(out)!r})\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [n for n in os.listdir(tmp_path) if n.startswith("out.tmp-")]
    assert len(left) == 1 and os.path.isfile(tmp_path / left[0] / "meta.json")
    s = ShardSet(str(out))
    assert s.sources == [str(d / "b.jsonl")]
    np.testing.assert_array_equal(s.read(0, s.num_tokens), before)
    # Running it again completes and replaces the set.
    prepare([str(d / "c.jsonl.gz")], tok_dir, str(out))
    assert ShardSet(str(out)).sources == [str(d / "c.jsonl.gz")]


def test_prepare_records_its_tokenizer_and_a_changed_one_is_refused(tok_dir, inputs, tmp_path):
    """meta.json names the tokenizer prepare used; the in-loop eval takes it when data.tokenizer is unset, after
    checking it still has the shards' fingerprint."""
    import shutil

    from megaslm.data.shards import ShardSet, recorded_tokenizer
    from megaslm.errors import UserError

    tok = tmp_path / "tok"
    shutil.copytree(tok_dir, tok)
    d, _ = inputs
    meta = prepare([str(d / "a.txt")], str(tok), str(tmp_path / "s"))
    assert meta["tokenizer"] == load_tokenizer(str(tok)).path and meta["tokenizer"].startswith(str(tok))
    shards = ShardSet(str(tmp_path / "s"))
    assert recorded_tokenizer(shards) == meta["tokenizer"]
    other = train_tokenizer([str(d / "b.jsonl")], 420, str(tmp_path / "other"))
    shutil.rmtree(tok)
    shutil.copytree(other, tok)  # the same path now holds another tokenizer
    with pytest.raises(UserError) as e:
        recorded_tokenizer(shards)
    assert str(e.value).startswith(f"the tokenizer {meta['tokenizer']} recorded in {tmp_path / 's' / 'meta.json'} has "
                                   f"changed since the shards were made (sha256 ")
