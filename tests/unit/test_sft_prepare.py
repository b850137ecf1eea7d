"""`prepare` of SFT records (prompt/response, chat) into masked shards, and of text that is not UTF-8."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaslm.data.loader import PackedLoader
from megaslm.data.prepare import prepare
from megaslm.data.shards import ShardSet
from megaslm.data.tokenizer import load_tokenizer
from megaslm.errors import UserError
from tests.conftest import run_cli

PAIRS = [{"q": f"What is item {i} of the series?", "a": f"It is the value {i * 7} of the sum."} for i in range(40)]
CHATS = [{"messages": [{"role": "user", "content": f"Compute the derivative number {i}."},
                       {"role": "assistant", "content": f"The derivative is {i} x."},
                       {"role": "user", "content": "And the integral?"},
                       {"role": "assistant", "content": f"The integral is {i} over two."}]} for i in range(30)]


def expected_pair_stream(tok, records):
    """Tokens and mask computed independently: prompt + newline (no loss), response (loss), EOS (loss)."""
    toks, mask = [], []
    for r in records:
        p, a = tok.encode_batch([r["q"] + "\n", r["a"]])
        toks += p + a + [tok.eos_id]
        mask += [0] * len(p) + [1] * len(a) + [1]
    return np.array(toks), np.array(mask, bool)


def test_prompt_response_jsonl_and_parquet_mask_only_the_response(tmp_path, tiny_data):
    tok = load_tokenizer(tiny_data["tok"])
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    pq.write_table(pa.table({"q": [r["q"] for r in PAIRS], "a": [r["a"] for r in PAIRS]}), tmp_path / "sft.parquet")
    want_toks, want_mask = expected_pair_stream(tok, PAIRS)
    for name in ("sft.jsonl", "sft.parquet"):
        meta = prepare([str(tmp_path / name)], tiny_data["tok"], str(tmp_path / name.replace(".", "_")),
                       sft_fields={"prompt": "q", "response": "a"})
        s = ShardSet(str(tmp_path / name.replace(".", "_")))
        assert meta["loss_mask"] and meta["format_version"] == 2 and s.has_loss_mask
        assert s.read(0, s.num_tokens).tolist() == want_toks.tolist()
        assert s.read_loss_mask(0, s.num_tokens).tolist() == want_mask.tolist()


def test_masked_shards_give_labels_minus_100_on_prompt_tokens(tmp_path, tiny_data):
    """The loader turns mask 0 into label -100: n_valid equals the response-token count."""
    tok = load_tokenizer(tiny_data["tok"])
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    prepare([str(tmp_path / "sft.jsonl")], tok, str(tmp_path / "s"), sft_fields={"prompt": "q", "response": "a"})
    toks, mask = expected_pair_stream(tok, PAIRS)
    L = 16
    loader = PackedLoader(str(tmp_path / "s"), L, 4)
    n = loader.n_seq
    got = [b for b in loader.eval_batches()]
    labels = np.concatenate([b["labels"].numpy() for b in got])[:n]
    want = np.where(mask[1:n * L + 1], toks[1:n * L + 1], -100).reshape(n, L)
    assert (labels == want).all()
    assert int((labels != -100).sum()) == int(mask[1:n * L + 1].sum())


def test_chat_messages_loss_on_assistant_turns_only(tmp_path, tiny_data):
    tok = load_tokenizer(tiny_data["tok"])
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    prepare([str(tmp_path / "chat.jsonl")], tok, str(tmp_path / "c"), sft_fields={"messages": "messages"})
    toks, mask = [], []
    for r in CHATS:
        for m in r["messages"]:
            h, c = tok.encode_batch([m["role"] + ": ", m["content"] + "\n"])
            toks += h + c
            mask += [0] * len(h) + [int(m["role"] == "assistant")] * len(c)
        toks.append(tok.eos_id)
        mask.append(mask[-1])
    s = ShardSet(str(tmp_path / "c"))
    assert s.read(0, s.num_tokens).tolist() == toks
    assert s.read_loss_mask(0, s.num_tokens).tolist() == [bool(x) for x in mask]


def test_sft_field_errors_name_file_and_field(tmp_path, tiny_data):
    (tmp_path / "x.jsonl").write_text(json.dumps({"q": "a"}) + "\n")
    with pytest.raises(UserError, match="x.jsonl has no field 'a'"):
        prepare([str(tmp_path / "x.jsonl")], tiny_data["tok"], str(tmp_path / "o"),
                sft_fields={"prompt": "q", "response": "a"})
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(UserError, match="m.jsonl: message 0"):
        prepare([str(tmp_path / "m.jsonl")], tiny_data["tok"], str(tmp_path / "o"), sft_fields={"messages": "messages"})


def test_bad_utf8_reported_skipped_or_refused(tmp_path, tiny_data):
    (tmp_path / "a.txt").write_bytes(b"first good paragraph\n\nbad \xff\xfe bytes\n\nthird good one\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "good"}\n{"text": "bad \xc3\x28"}\n{"text": "fine"}\n')
    out = tmp_path / "o"
    with pytest.raises(UserError, match=r"a.txt: document 2 is not valid UTF-8.*--on-bad-utf8 skip"):
        prepare([str(tmp_path / "a.txt")], tiny_data["tok"], str(out))
    assert not out.exists()
    meta = prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tiny_data["tok"], str(out),
                   on_bad_utf8="skip")
    assert meta["num_documents"] == 4 and meta["bad_utf8_documents"] == 2
    assert [e.split("/")[-1] for e in meta["bad_utf8_examples"]] == ["a.txt: document 2", "b.jsonl: line 2"]
    assert json.loads((out / "meta.json").read_text())["bad_utf8_documents"] == 2
    res = run_cli("prepare", "--input", str(tmp_path / "b.jsonl"), "--tokenizer", tiny_data["tok"],
                  "--out", str(tmp_path / "cli"))
    assert res.returncode == 2 and "error: " in res.stderr and "b.jsonl: line 2 is not valid UTF-8" in res.stderr
    res = run_cli("prepare", "--input", str(tmp_path / "b.jsonl"), "--tokenizer", tiny_data["tok"],
                  "--out", str(tmp_path / "cli"), "--on-bad-utf8", "skip", check=True)
    assert "skipped 1 not valid UTF-8" in res.stdout and "b.jsonl: line 2" in res.stderr


@pytest.mark.parametrize("scope", ["sequence", "rank", "global"])
def test_slm_on_masked_data_counts_and_selects_response_tokens_only(tmp_path, tiny_data, scope):
    """n_valid is the response-token count of the batch; no prompt token is ever selected or carries loss."""
    import torch

    from megaslm.loss import select_tokens
    from megaslm.loss.objective import Objective, compute_objective

    tok = load_tokenizer(tiny_data["tok"])
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    prepare([str(tmp_path / "sft.jsonl")], tok, str(tmp_path / "s"), sft_fields={"prompt": "q", "response": "a"})
    toks, mask = expected_pair_stream(tok, PAIRS)
    L, loader = 16, PackedLoader(str(tmp_path / "s"), 16, 6, seed=1)
    b = loader.next_batch()
    response = torch.from_numpy(np.stack([mask[i * L + 1:i * L + L + 1] for i in b["index"].tolist()]))
    g = torch.Generator().manual_seed(0)
    token_loss = torch.rand(b["labels"].shape, generator=g).requires_grad_(True)
    ref_loss = torch.rand(b["labels"].shape, generator=g)
    # Prompt tokens get the highest excess: a selection that looked at them would pick them first.
    token_loss_in = torch.where(response, token_loss, token_loss + 100.0)
    valid = b["labels"] != -100
    assert torch.equal(valid, response)
    loss, stats = compute_objective(torch.where(valid, token_loss_in, 0.0), ref_loss, valid,
                                    objective=Objective("slm", scope=scope),
                                    ratio=0.5)
    assert stats["n_valid"] == int(response.sum())
    selected = select_tokens(token_loss_in.detach() - ref_loss, valid, 0.5, scope)
    assert selected.any() and not (selected & ~response).any()
    loss.backward()
    assert (token_loss.grad[~response] == 0).all() and (token_loss.grad[response] != 0).any()
