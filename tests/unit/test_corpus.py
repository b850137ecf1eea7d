import glob
import json

import pytest

from megaslm.data import corpus
from megaslm.data.corpus import build_demo_corpora, clean_documents, noisy_documents
from megaslm.errors import UserError

has_changelogs = bool(glob.glob("/usr/share/doc/*/changelog*.gz"))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_clean_documents_are_deterministic_prose():
    a = list(clean_documents(60_000, seed=4))
    assert a == list(clean_documents(60_000, seed=4))
    assert a != list(clean_documents(60_000, seed=5))
    size = sum(len(d["text"].encode()) for d in a)
    assert 60_000 <= size < 60_000 + max(len(d["text"].encode()) for d in a)
    assert {d["source"] for d in a} <= {"sympy", "networkx", "mpmath"}
    assert len({d["text"] for d in a}) == len(a)
    for d in a:
        assert len(d["text"]) >= 200 and "\t" not in d["text"] and "\n\n\n" not in d["text"]
        assert d["text"] == d["text"].strip()


@pytest.mark.skipif(not has_changelogs, reason="needs Debian's /usr/share/doc changelogs")
def test_noisy_documents():
    docs = list(noisy_documents(100_000, seed=0))
    assert docs and {d["source"] for d in docs} <= {"changelog", "html", "text"}
    assert "changelog" in {d["source"] for d in docs}
    assert all(len(d["text"].encode()) <= corpus.MAX_NOISY_DOC_BYTES for d in docs)


@pytest.mark.skipif(not has_changelogs, reason="needs Debian's /usr/share/doc changelogs")
def test_build_demo_corpora_disjoint_splits(tmp_path):
    paths = build_demo_corpora(str(tmp_path), clean_bytes=120_000, noisy_bytes=100_000, valid_bytes=30_000,
                               seed=0)
    assert set(paths) == {"clean_train", "noisy_train_clean", "noisy_train_noise", "clean_valid"}
    texts = {}
    for name, path in paths.items():
        docs = read(path)
        assert docs, name
        texts[name] = {d["text"] for d in docs}
        size = sum(len(d["text"].encode()) for d in docs)
        assert size > 0.5 * {"clean_train": 120_000, "noisy_train_clean": 50_000, "noisy_train_noise": 50_000,
                             "clean_valid": 30_000}[name], (name, size)
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b)
    assert {d["source"] for d in read(paths["noisy_train_noise"])} <= {"changelog", "html", "text"}
    assert {d["source"] for d in read(paths["clean_valid"])} <= {"sympy", "networkx", "mpmath"}


def test_missing_sources_raise(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "DOC_ROOT", str(tmp_path))
    with pytest.raises(UserError, match="changelog"):
        list(noisy_documents(1000))
    monkeypatch.setattr(corpus, "CLEAN_PACKAGES", ("no_such_package_xyz",))
    with pytest.raises(UserError, match="no_such_package_xyz"):
        list(clean_documents(1000))
