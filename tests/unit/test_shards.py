import json
import os
import pickle
import shutil

import numpy as np
import pytest

from megaslm.data.shards import ShardSet, ShardWriter, check_compatible
from megaslm.errors import UserError

EOS = 2


def make_docs(n, vocab, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, vocab, size=rng.integers(0, max_len)) for _ in range(n)]
    srcs = [int(rng.integers(0, 3)) for _ in range(n)]
    return docs, srcs


def reference(docs, srcs):
    """The stream and per-token source, computed independently of the writer."""
    toks, src = [], []
    for d, s in zip(docs, srcs):
        toks += list(d) + [EOS]
        src += [s] * (len(d) + 1)
    return np.array(toks, np.int64), np.array(src, np.int64)


def write(out, docs, srcs, vocab=1000, max_tokens=100, bulk=False, fingerprint="ab" * 32):
    with ShardWriter(str(out), vocab, fingerprint, EOS, ["a.txt", "b.jsonl", "c.parquet"],
                     max_tokens_per_shard=max_tokens, buffer_tokens=37) as w:
        if bulk:  # consecutive runs of one source through add_documents
            i = 0
            while i < len(docs):
                j = i
                while j < len(docs) and srcs[j] == srcs[i]:
                    j += 1
                flat = np.concatenate(docs[i:j]) if j > i else np.zeros(0, np.int64)
                w.add_documents(flat, [len(d) for d in docs[i:j]], srcs[i])
                i = j
        else:
            for d, s in zip(docs, srcs):
                w.add_document(d, s)
        return w.close()


@pytest.mark.parametrize("vocab,dtype", [(1000, "uint16"), (65535, "uint16"), (70000, "uint32")])
def test_round_trip_across_files(tmp_path, vocab, dtype):
    docs, srcs = make_docs(60, vocab, seed=vocab)
    docs[5] = np.arange(3, 260) % vocab  # one document longer than a whole file
    meta = write(tmp_path / "s", docs, srcs, vocab=vocab)
    toks, src = reference(docs, srcs)
    s = ShardSet(str(tmp_path / "s"))
    assert meta == s.meta
    assert (s.meta["dtype"], s.num_tokens, s.meta["num_documents"]) == (dtype, len(toks), 60)
    assert (s.vocab_size, s.eos_id, s.fingerprint) == (vocab, EOS, "ab" * 32)
    assert s.sources == ["a.txt", "b.jsonl", "c.parquet"]
    assert len(meta["shards"]) > 3
    itemsize = np.dtype(dtype).itemsize
    for sh in meta["shards"]:
        f = tmp_path / "s" / sh["file"]
        assert f.stat().st_size == sh["num_tokens"] * itemsize
        raw = np.fromfile(f, dtype="<" + ("u2" if dtype == "uint16" else "u4"))
        assert raw[-1] == EOS  # files end on a document boundary
        assert sh["num_tokens"] <= 100 or sh["num_documents"] == 1
    assert sum(sh["num_tokens"] for sh in meta["shards"]) == len(toks)
    assert meta["source_tokens"] == [int((src == k).sum()) for k in range(3)]
    np.testing.assert_array_equal(s.read(0, len(toks)), toks)
    bounds = np.cumsum([0] + [sh["num_tokens"] for sh in meta["shards"]])
    rng = np.random.default_rng(1)
    starts, lengths = rng.integers(0, len(toks) - 60, 30), rng.integers(0, 60, 30)
    ranges = [(b - 3, b + 4) for b in bounds[1:-1]] + [(int(a), int(a + n)) for a, n in zip(starts, lengths)]
    for a, b in ranges + [(0, 0), (len(toks) - 1, len(toks))]:
        got = s.read(a, b)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, toks[a:b])
        np.testing.assert_array_equal(s.source_of_tokens(a, b), src[a:b])
    with pytest.raises(IndexError):
        s.read(0, len(toks) + 1)
    clone = pickle.loads(pickle.dumps(s))  # memory maps are reopened after unpickling
    np.testing.assert_array_equal(clone.read(10, 200), toks[10:200])


def test_bulk_add_equals_per_document(tmp_path):
    docs, srcs = make_docs(80, 500, seed=3)
    write(tmp_path / "one", docs, srcs, vocab=500, max_tokens=64)
    write(tmp_path / "bulk", docs, srcs, vocab=500, max_tokens=64, bulk=True)
    a, b = ShardSet(str(tmp_path / "one")), ShardSet(str(tmp_path / "bulk"))
    assert [x["num_tokens"] for x in a.meta["shards"]] == [x["num_tokens"] for x in b.meta["shards"]]
    for sh in a.meta["shards"]:
        for key in ("file", "docs_file"):
            assert (tmp_path / "one" / sh[key]).read_bytes() == (tmp_path / "bulk" / sh[key]).read_bytes()


def test_rejects_ids_outside_vocab(tmp_path):
    with ShardWriter(str(tmp_path / "s"), 100, "f", EOS, ["x"]) as w:
        with pytest.raises(UserError, match=r"token id 100 .*vocab_size 100"):
            w.add_document([5, 100], 0)


def test_validation_errors_name_the_file(tmp_path):
    docs, srcs = make_docs(30, 1000)
    good = tmp_path / "good"
    write(good, docs, srcs)
    with pytest.raises(UserError, match="missing-dir"):
        ShardSet(str(tmp_path / "missing-dir"))
    (tmp_path / "nometa").mkdir()
    with pytest.raises(UserError, match="meta.json"):
        ShardSet(str(tmp_path / "nometa"))

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    meta = json.loads((good / "meta.json").read_text())
    d = broken("partial_meta", lambda d: (d / "meta.json").write_text((good / "meta.json").read_text()[:50]))
    with pytest.raises(UserError, match="partial_meta/meta.json"):
        ShardSet(d)
    d = broken("version", lambda d: (d / "meta.json").write_text(json.dumps({**meta, "format_version": 99})))
    with pytest.raises(UserError, match="format_version 99"):
        ShardSet(d)
    first = meta["shards"][0]["file"]
    d = broken("truncated", lambda d: open(d / first, "r+b").truncate(10))
    with pytest.raises(UserError, match=f"truncated/{first}.*10 bytes"):
        ShardSet(d)
    d = broken("nofile", lambda d: os.unlink(d / first))
    with pytest.raises(UserError, match=f"nofile/{first}.*missing"):
        ShardSet(d)
    d = broken("nokey", lambda d: (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                                           if k != "eos_id"})))
    with pytest.raises(UserError, match="eos_id"):
        ShardSet(d)


def test_failed_write_keeps_previous_set(tmp_path):
    out = tmp_path / "s"
    docs, srcs = make_docs(40, 1000, seed=1)
    write(out, docs, srcs)
    toks, _ = reference(docs, srcs)
    # An exception mid-way: the context manager removes the temporary directory, the old set is intact.
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(out), 1000, "new", EOS, ["x"], max_tokens_per_shard=50) as w:
            for d in make_docs(40, 1000, seed=9)[0]:
                w.add_document(d, 0)
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["s"]
    # A killed run: files written, close() never called; its .tmp- directory is left behind.
    w = ShardWriter(str(out), 1000, "new", EOS, ["x"], max_tokens_per_shard=50)
    for d in make_docs(40, 1000, seed=9)[0]:
        w.add_document(d, 0)
    assert os.path.basename(w.tmp_dir).startswith("s.tmp-")
    assert len(os.listdir(w.tmp_dir)) > 1 and not os.path.exists(os.path.join(w.tmp_dir, "meta.json"))
    s = ShardSet(str(out))
    assert s.fingerprint == "ab" * 32
    np.testing.assert_array_equal(s.read(0, s.num_tokens), toks)
    # The leftover directory is not a valid set either.
    with pytest.raises(UserError, match="meta.json"):
        ShardSet(w.tmp_dir)
    # A later complete write replaces the old set.
    docs2, srcs2 = make_docs(10, 1000, seed=5)
    write(out, docs2, srcs2, fingerprint="cd" * 32)
    s = ShardSet(str(out))
    assert s.fingerprint == "cd" * 32
    np.testing.assert_array_equal(s.read(0, s.num_tokens), reference(docs2, srcs2)[0])
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n]


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    out = tmp_path / "mydata"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    with pytest.raises(UserError, match="mydata.*not a shard set"):
        ShardWriter(str(out), 100, "f", EOS, ["x"])
    assert (out / "important.txt").read_text() == "keep me"


def test_check_compatible(tmp_path):
    docs, srcs = make_docs(5, 512)
    write(tmp_path / "s", docs, srcs, vocab=512)
    s = ShardSet(str(tmp_path / "s"))
    check_compatible(s, 512, "ab" * 32, "tiny")
    check_compatible(s, 512, None, "tiny")
    msg = r"shards .*/s were tokenized with vocab_size 512 .*model tiny has vocab_size 1000"
    with pytest.raises(UserError, match=msg):
        check_compatible(s, 1000, None, "tiny")
    with pytest.raises(UserError, match=r"different tokenizer.*abab.*tiny.*ffff"):
        check_compatible(s, 512, "f" * 64, "tiny")


def test_loss_mask_written_beside_tokens_and_read_back(tmp_path):
    """Masks cross file boundaries like tokens; EOS takes its document's last mask; unmasked sets read as ones."""
    docs, srcs = make_docs(60, 1000, seed=4)
    rng = np.random.default_rng(5)
    masks = [rng.integers(0, 2, size=len(d)).astype(np.uint8) for d in docs]
    out = tmp_path / "m"
    with ShardWriter(str(out), 1000, "ab" * 32, EOS, ["a", "b", "c"], max_tokens_per_shard=50,
                     buffer_tokens=17, loss_mask=True) as w:
        for d, s, m in zip(docs, srcs, masks):
            w.add_document(d, s, m)
        meta = w.close()
    expect = []
    for d, m in zip(docs, masks):
        expect += list(m) + [m[-1] if len(m) else 1]
    s = ShardSet(str(out))
    assert meta["format_version"] == 2 and s.has_loss_mask and len(meta["shards"]) > 2
    assert s.read_loss_mask(0, s.num_tokens).tolist() == [bool(x) for x in expect]
    assert s.read_loss_mask(7, 93).tolist() == [bool(x) for x in expect[7:93]]
    toks, _ = reference(docs, srcs)
    assert s.read(0, s.num_tokens).tolist() == toks.tolist()


def test_format_version_1_sets_still_read(tmp_path):
    docs, srcs = make_docs(20, 1000)
    out = tmp_path / "v1"
    write(out, docs, srcs)
    meta = json.loads((out / "meta.json").read_text())
    meta["format_version"] = 1
    del meta["loss_mask"]
    (out / "meta.json").write_text(json.dumps(meta))
    s = ShardSet(str(out))
    assert not s.has_loss_mask and s.read_loss_mask(0, 10).all()
    assert s.read(0, s.num_tokens).tolist() == reference(docs, srcs)[0].tolist()


def test_content_hashes_match_the_files_written(tmp_path):
    """prepare's per-shard hash, computed while writing, equals one computed from the files read back."""
    import hashlib

    docs, srcs = make_docs(60, 1000, seed=3)
    meta = write(tmp_path / "s", docs, srcs)
    assert len(meta["shards"]) > 2
    whole = hashlib.blake2b(digest_size=16)
    for sh in meta["shards"]:
        parts = [(tmp_path / "s" / sh["file"]).read_bytes(), np.load(tmp_path / "s" / sh["docs_file"]).tobytes()]
        h = hashlib.blake2b(digest_size=16)
        for p in parts:
            h.update(hashlib.blake2b(p, digest_size=16).digest())
        assert sh["content_blake2b"] == h.hexdigest()
        whole.update(h.hexdigest().encode())
    assert meta["content_hash"] == whole.hexdigest()
    assert ShardSet(str(tmp_path / "s")).shard_hashes == [sh["content_blake2b"] for sh in meta["shards"]]
