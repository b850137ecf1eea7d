import hashlib
import json
import os
import pickle
import shutil

import pytest

from megaslm.data.corpus import clean_documents
from megaslm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer, train_tokenizer
from megaslm.errors import UserError

# Strings where SentencePiece and a naive HF conversion disagree: leading/multiple spaces, newlines and tabs
# (byte fallback), characters never seen in training, special-token text, the meta symbol itself.
TRICKY = ["Hello world", "  two leading spaces", "trailing  ", " ", "", "a\nb\n\nc\td", "x",
          "<s> </s> <unk> as text", "日本語 😀 ½ ﬁ é e\u0301", "▁ meta ▁▁x", "12345 + 0.5 = 12345.5"]


@pytest.fixture(scope="module")
def docs():
    return [d["text"] for d in clean_documents(max_bytes=250_000, seed=1)]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp("tok")
    path = d / "train.jsonl"
    with open(path, "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    return train_tokenizer([str(path)], 600, str(d / "out"))


def test_train_writes_llama_convention_model(tok_dir, docs):
    model = os.path.join(tok_dir, "tokenizer.model")
    assert os.path.isfile(model)
    assert not [n for n in os.listdir(tok_dir) if "tmp" in n]
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (600, 1, 2)
    with open(model, "rb") as f:
        assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
    # Same model whether given as the directory or the .model file.
    assert load_tokenizer(model).fingerprint == tok.fingerprint
    # BPE actually learned merges: well under one token per character on its training text.
    ids = tok.encode_batch(docs[:20])
    assert sum(map(len, ids)) < 0.7 * sum(map(len, docs[:20]))


def test_encode_decode_round_trip_and_no_specials(tok_dir, docs):
    tok = load_tokenizer(tok_dir)
    # "▁" itself cannot round-trip: SentencePiece decodes it as a space.
    texts = [t for t in TRICKY if "▁" not in t] + docs[:10]
    ids = tok.encode_batch(texts)
    assert len(ids) == len(texts)
    for text, seq in zip(texts, ids):
        assert all(0 <= i < tok.vocab_size for i in seq)
        assert tok.eos_id not in seq and tok.bos_id not in seq  # encode_batch adds no BOS/EOS
        assert tok.decode(seq) == text  # byte fallback + identity normalization: lossless
    assert ids[TRICKY.index("")] == []


def test_text_field_and_txt_inputs(tmp_path, docs):
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"content": t, "other": 1}) + "\n" for t in docs[:200]))
    txt = tmp_path / "p.txt"
    txt.write_text("\n\n".join(docs[200:400]))
    out = train_tokenizer([str(jl), str(txt)], 400, str(tmp_path / "t"), text_field="content")
    assert load_tokenizer(out).vocab_size == 400
    with pytest.raises(UserError, match=r"c\.jsonl.*'text'"):
        train_tokenizer([str(jl)], 400, str(tmp_path / "t2"))


def test_save_pretrained_loads_in_transformers_with_same_ids(tok_dir, docs, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tok_dir)
    out = tok.save_pretrained(str(tmp_path / "hf"))
    assert load_tokenizer(out).fingerprint == tok.fingerprint
    hf = AutoTokenizer.from_pretrained(out)
    assert (hf.eos_token_id, hf.bos_token_id, len(hf)) == (tok.eos_id, tok.bos_id, tok.vocab_size)
    texts = TRICKY + docs[:200]
    ours = tok.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids) == tok.decode(ids)


def test_hf_directory_loads_through_transformers(tok_dir, tmp_path, docs):
    tok = load_tokenizer(tok_dir)
    hf_dir = tmp_path / "hf_only"
    tok.save_pretrained(str(hf_dir))
    os.unlink(hf_dir / "tokenizer.model")  # now only tokenizer.json & config: the transformers path
    hf = load_tokenizer(str(hf_dir))
    assert isinstance(hf, HFTokenizer)
    assert hf.fingerprint == hashlib.sha256((hf_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert (hf.vocab_size, hf.eos_id, hf.bos_id) == (tok.vocab_size, tok.eos_id, tok.bos_id)
    texts = TRICKY + docs[:20]
    assert hf.encode_batch(texts) == tok.encode_batch(texts)
    # Copies are verbatim, so the fingerprint survives save_pretrained and pickling.
    again = load_tokenizer(hf.save_pretrained(str(tmp_path / "hf_copy")))
    assert again.fingerprint == hf.fingerprint
    clone = pickle.loads(pickle.dumps(hf))
    assert clone.fingerprint == hf.fingerprint and clone.encode_batch(texts) == tok.encode_batch(texts)


def test_pickle_sentencepiece(tok_dir, docs, tmp_path):
    tok = load_tokenizer(tok_dir)
    moved = tmp_path / "moved"
    shutil.copytree(tok_dir, moved)
    tok = load_tokenizer(str(moved))
    blob = pickle.dumps(tok)
    shutil.rmtree(moved)  # workers rebuild from the pickled bytes, not the file
    clone = pickle.loads(blob)
    assert clone.fingerprint == tok.fingerprint
    assert clone.encode_batch(docs[:5]) == tok.encode_batch(docs[:5])


def test_training_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="nope.jsonl"):
        train_tokenizer([missing], 512, str(tmp_path / "t"))
    small = tmp_path / "small.txt"
    small.write_text("the quick brown fox jumps over the lazy dog\n\nhello world\n")
    with pytest.raises(UserError, match=r"vocab_size 5000.*(too high|<=)"):
        train_tokenizer([str(small)], 5000, str(tmp_path / "t"))
    assert not (tmp_path / "t" / "tokenizer.model").exists()
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(UserError, match=r"data\.csv"):
        train_tokenizer([str(bad)], 512, str(tmp_path / "t"))


def test_load_errors_name_the_spec(tmp_path):
    with pytest.raises(UserError, match="does-not-exist"):
        load_tokenizer(str(tmp_path / "does-not-exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        load_tokenizer(str(empty))
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model" * 10)
    with pytest.raises(UserError, match="garbage.model"):
        load_tokenizer(str(garbage))
    other = tmp_path / "vocab.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="vocab.bin"):
        load_tokenizer(str(other))
