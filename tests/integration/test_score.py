"""`megaslm score` (step 2 of Rho-1) and CachedReference: the cache against full-logits losses computed here,
against the online reference, across rank counts, after crashes, and its refusals."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, run_cli, write_config

pytestmark = pytest.mark.slow

SEQ = 32
CHUNK_TOKENS = 2048  # 64 sequences per chunk: the validation shards make 11 chunks, the last one short


def _cli_has_score() -> bool:
    from megaslm.cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return any("score" in a.choices for a in subs)


def score_cli(*args, nproc=None, env=None, check=False):
    """`megaslm score ARGS` through the CLI once it has the subcommand, else `python -m megaslm.reference.score ARGS`.
    float32 storage unless ARGS say otherwise: these tests compare the cache with full-logits losses exactly."""
    if "--storage-dtype" not in args:
        args = (*args, "--storage-dtype", "float32")
    if _cli_has_score():
        return run_cli("score", *args, nproc=nproc, env=env, check=check)
    from megaslm.parallel.dist import free_port

    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}"] if nproc else [sys.executable])
    cmd = [*launch, "-m", "megaslm.reference.score", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
    lines = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-4000:]
    return lines[0]


def score_config(tmp_path, data, ref, cache, name="s.yaml", **reference):
    cfg = {"run": {"dir": str(tmp_path / "run")}, "data": {"train": data["valid"]},
           "train": {"seq_len": SEQ, "micro_batch_size": 8}, "wandb": {"mode": "disabled"}, "objective": "slm",
           "reference": {"path": str(ref), "placement": "replicated", "cache": str(cache), **reference}}
    return write_config(tmp_path / name, cfg)


def chunk_bytes(cache) -> bytes:
    return b"".join(f.read_bytes() for f in sorted((Path(cache) / "chunks").glob("*.bin")))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_data):
    """Two reference models with the shards' tokenizer (different weights)."""
    from transformers import AutoModelForCausalLM

    from megaslm.data.tokenizer import load_tokenizer
    from megaslm.model.presets import preset_config

    out = tmp_path_factory.mktemp("score_ref")
    for name, seed in (("good", 11), ("other", 12)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(preset_config("tiny", 512)).save_pretrained(out / name)
        load_tokenizer(tiny_data["tok"]).save_pretrained(str(out / name))
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_data, models):
    """The validation shards scored by 2 gloo ranks."""
    root = tmp_path_factory.mktemp("scored")
    cache = root / "cache"
    cfg = score_config(root, tiny_data, models / "good", cache)
    res = score_cli(str(cfg), "--chunk-tokens", str(CHUNK_TOKENS), nproc=2, check=True)
    assert "tok/s" in res.stdout and "done:" in res.stdout, res.stdout
    return {"cache": cache, "config": cfg, "root": root}


def hf_losses(model, input_ids, labels):
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                           ignore_index=-100).view(labels.shape)


def test_cache_equals_full_logits_cross_entropy(scored, tiny_data, models):
    from transformers import AutoModelForCausalLM

    from megaslm.data.loader import PackedLoader
    from megaslm.data.shards import ShardSet
    from megaslm.reference import CachedReference

    shards = ShardSet(tiny_data["valid"])
    n_seq = (shards.num_tokens - 1) // SEQ
    meta = json.loads((scored["cache"] / "meta.json").read_text())
    assert (meta["seq_len"], meta["num_sequences"], meta["chunk_sequences"]) == (SEQ, n_seq, CHUNK_TOKENS // SEQ)
    assert meta["num_chunks"] == -(-n_seq // 64) and meta["world_size"] == 2 and meta["storage_dtype"] == "float32"
    assert not list(scored["root"].glob("cache.tmp-*")), "work directory left behind"

    model = AutoModelForCausalLM.from_pretrained(models / "good").eval()
    cache = CachedReference(str(scored["cache"]), shards, SEQ)
    loader = PackedLoader(shards, SEQ, 4, seed=3)
    batches = [loader.next_batch() for _ in range(3)]
    *_, padded = loader.eval_batches(n_seq)  # the last eval batch: short, padded with index -1 rows
    n_real = n_seq % 4 or 4
    assert n_real < 4 and (padded["index"][n_real:] == -1).all()
    for b in [*batches, padded]:
        want = hf_losses(model, b["input_ids"], b["labels"])
        got = cache.losses_for(b)
        assert got.dtype == torch.float32 and got.shape == b["labels"].shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (cache.losses_for(padded)[n_real:] == 0).all()

    # The on-disk layout, read by hand: the concatenated chunk files are the losses of positions 1 .. n_seq*T,
    # row i column j predicting token i*T + j + 1 from the window tokens[i*T : i*T + T].
    flat = np.frombuffer(chunk_bytes(scored["cache"]), dtype="<f4")
    assert flat.size == n_seq * SEQ
    for i in (0, 1, 200, n_seq - 1):
        window = torch.from_numpy(shards.read(i * SEQ, i * SEQ + SEQ + 1).astype(np.int64))
        want = hf_losses(model, window[None, :-1], window[None, 1:])[0].numpy()
        np.testing.assert_allclose(flat[i * SEQ:(i + 1) * SEQ], want, rtol=1e-5, atol=1e-6)
    by_pos = cache.token_losses(0, shards.num_tokens)
    assert np.isnan(by_pos[0]) and np.isnan(by_pos[n_seq * SEQ + 1:]).all()
    np.testing.assert_array_equal(by_pos[1:n_seq * SEQ + 1], flat)
    np.testing.assert_array_equal(cache.token_losses(100, 140), flat[99:139])


def test_crash_leaves_no_cache_and_one_rank_resumes_to_the_same_files(scored, tiny_data, models, tmp_path):
    from megaslm.data.shards import ShardSet
    from megaslm.errors import UserError
    from megaslm.reference import CachedReference

    cache = tmp_path / "cache1"
    cfg = score_config(tmp_path, tiny_data, models / "good", cache)
    res = score_cli(str(cfg), "--chunk-tokens", str(CHUNK_TOKENS), env={"MEGASLM_FAULT": "crash_in_score:3"})
    assert res.returncode != 0 and "injected fault crash_in_score" in res.stderr, res.stderr[-3000:]
    assert not cache.exists()
    (work,) = tmp_path.glob("cache1.tmp-*")
    assert sorted(f.name for f in (work / "chunks").iterdir()) == [f"{c:08d}.bin" for c in range(4)]
    with pytest.raises(UserError, match="interrupted"):
        CachedReference(str(cache), ShardSet(tiny_data["valid"]), SEQ)
    with pytest.raises(UserError, match="no meta.json"):
        CachedReference(str(work), ShardSet(tiny_data["valid"]), SEQ)

    res = score_cli(str(cfg), "--chunk-tokens", str(CHUNK_TOKENS), check=True)
    assert "4 of 11 chunks already scored" in res.stdout, res.stdout
    assert not work.exists()
    # One rank (resumed) and two ranks wrote the same bytes; the meta differs only in world size and time.
    assert chunk_bytes(cache) == chunk_bytes(scored["cache"])
    a, b = (json.loads((d / "meta.json").read_text()) for d in (cache, scored["cache"]))
    assert a["world_size"] == 1 and b["world_size"] == 2
    for m in (a, b):
        del m["world_size"], m["created"]
    assert a == b


def test_crash_while_rescoring_keeps_the_existing_cache(scored, tiny_data, models):
    from megaslm.data.loader import PackedLoader
    from megaslm.data.shards import ShardSet
    from megaslm.reference import CachedReference

    before = chunk_bytes(scored["cache"])
    meta = (scored["cache"] / "meta.json").read_text()
    res = score_cli(str(scored["config"]), "--chunk-tokens", str(CHUNK_TOKENS), "--force", nproc=2,
                    env={"MEGASLM_FAULT": "crash_in_score:2"})
    assert res.returncode != 0 and "injected fault crash_in_score" in res.stderr, res.stderr[-3000:]
    assert chunk_bytes(scored["cache"]) == before and (scored["cache"] / "meta.json").read_text() == meta
    shards = ShardSet(tiny_data["valid"])
    batch = PackedLoader(shards, SEQ, 4).next_batch()
    assert CachedReference(str(scored["cache"]), shards, SEQ).losses_for(batch).abs().sum() > 0
    for work in scored["root"].glob("cache.tmp-*"):  # the interrupted job's work directory
        shutil.rmtree(work)


COMPARE = r"""
import sys
import numpy as np
import torch
from megaslm.config import from_dict
from megaslm.data.loader import PackedLoader
from megaslm.data.shards import ShardSet
from megaslm.parallel import dist as mdist
from megaslm.reference import make_reference

cache, ref, data, out = sys.argv[1:5]
mdist.init_distributed()
shards = ShardSet(data)
def cfg(cache):
    return from_dict({"run": {"dir": "unused"}, "data": {"train": data}, "objective": "slm",
                      "train": {"seq_len": 32, "micro_batch_size": 4},
                      "reference": {"path": ref, "placement": "replicated", "cache": cache}})
kw = dict(shards=shards, dtype=torch.float32, micro_batch_size=4, dp_size=1)
cached, online = make_reference(cfg(cache), **kw), make_reference(cfg(None), **kw)
loader = PackedLoader(shards, 32, 4, seed=7)
batches = [loader.next_batch() for _ in range(3)] + [list(loader.eval_batches(6))[1]]
res = {"types": np.array([type(cached).__name__, type(online).__name__])}
for k, b in enumerate(batches):
    res[f"cached{k}"], res[f"online{k}"] = cached.losses_for(b).numpy(), online.losses_for(b).numpy()
    res[f"index{k}"] = b["index"].numpy()
np.savez(out, **res)
torch.distributed.destroy_process_group()
"""


def test_cached_reference_equals_online_reference(scored, tiny_data, models, tmp_path):
    """make_reference builds both implementations from the config; losses_for agrees on the same batches."""
    script = tmp_path / "compare.py"
    script.write_text(COMPARE)
    out = tmp_path / "out.npz"
    res = subprocess.run([sys.executable, str(script), str(scored["cache"]), str(models / "good"),
                          tiny_data["valid"], str(out)], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    r = np.load(out)
    assert list(r["types"]) == ["CachedReference", "OnlineReference"]
    for k in range(4):
        np.testing.assert_allclose(r[f"cached{k}"], r[f"online{k}"], rtol=1e-5, atol=1e-6)
        assert (r[f"cached{k}"][r[f"index{k}"] >= 0] > 0).all()
    assert list(r["index3"]) == [4, 5, -1, -1] and (r["cached3"][2:] == 0).all() and (r["online3"][2:] == 0).all()


def test_cache_refuses_other_seq_len_shards_model_and_incomplete(scored, tiny_data, models, tmp_path):
    from megaslm.config import from_dict
    from megaslm.data.shards import ShardSet
    from megaslm.errors import UserError
    from megaslm.reference import CachedReference, make_reference

    valid, train = ShardSet(tiny_data["valid"]), ShardSet(tiny_data["train"])
    cache = str(scored["cache"])
    with pytest.raises(UserError, match=r"seq_len 32 but train.seq_len is 64"):
        CachedReference(cache, valid, 64)
    with pytest.raises(UserError) as e:
        CachedReference(cache, train, SEQ)
    assert tiny_data["valid"] in str(e.value) and tiny_data["train"] in str(e.value)
    assert f"num_tokens {valid.num_tokens}" in str(e.value) and f"num_tokens {train.num_tokens}" in str(e.value)

    def cfg(path, cache):
        return from_dict({"run": {"dir": "unused"}, "data": {"train": tiny_data["valid"]}, "objective": "slm",
                          "train": {"seq_len": SEQ}, "reference": {"path": path, "cache": cache}})

    kw = dict(shards=valid, dtype=torch.float32, micro_batch_size=4, dp_size=1)
    assert isinstance(make_reference(cfg(None, cache), **kw), CachedReference)
    assert isinstance(make_reference(cfg(str(models / "good"), cache), **kw), CachedReference)
    with pytest.raises(UserError, match=r"reference.path .*other has fingerprint"):
        make_reference(cfg(str(models / "other"), cache), **kw)

    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    (broken / "meta.json").unlink()
    with pytest.raises(UserError, match=r"broken holds no complete reference-loss cache \(no meta.json\)"):
        make_reference(cfg(None, str(broken)), **kw)
    with pytest.raises(UserError, match="does not exist"):
        CachedReference(str(tmp_path / "absent"), valid, SEQ)
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    with open(damaged / "chunks" / "00000004.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=r"00000004.bin is missing or not 8192 bytes"):
        CachedReference(str(damaged), valid, SEQ)
    # Same counts and sampled blocks, another byte in a shard: the per-shard content hashes (prepare's) differ.
    other = tmp_path / "other_shards"
    shutil.copytree(cache, other)
    meta = json.loads((other / "meta.json").read_text())
    assert meta["shards"]["shard_hashes"] == valid.shard_hashes
    meta["shards"]["shard_hashes"][0] = "0" * len(valid.shard_hashes[0])
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"scored on other data than data.train: shard file .* holds other content"):
        CachedReference(str(other), valid, SEQ)


def test_score_command_errors(tmp_path, tiny_data, models):
    no_cache = write_config(tmp_path / "a.yaml", {
        "run": {"dir": str(tmp_path / "r")}, "data": {"train": tiny_data["valid"]}, "objective": "slm",
        "reference": {"path": str(models / "good")}})
    assert "reference.cache is required" in one_line_error(score_cli(str(no_cache)))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cfg = score_config(tmp_path, tiny_data, models / "good", mine)
    err = one_line_error(score_cli(str(cfg)))
    assert str(mine) in err and "not a reference-loss cache" in err
    assert (mine / "notes.txt").read_text() == "keep me"
