"""Shared fixtures: a real tokenizer and token shards made from text that ships on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tokenizer (vocab 512) + train/valid shards from sympy/networkx docstrings, and a second tokenizer."""
    from megaslm.data.corpus import clean_documents
    from megaslm.data.prepare import prepare
    from megaslm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("data")
    docs = list(clean_documents(400_000, seed=0))
    cut = int(len(docs) * 0.85)
    for name, part in (("train.jsonl", docs[:cut]), ("valid.jsonl", docs[cut:])):
        with open(root / name, "w") as f:
            for d in part:
                f.write(json.dumps({"text": d["text"]}) + "\n")
    tok = train_tokenizer([str(root / "train.jsonl")], 512, str(root / "tok"))
    prepare([str(root / "train.jsonl")], tok, str(root / "train"))
    prepare([str(root / "valid.jsonl")], tok, str(root / "valid"))
    other = train_tokenizer([str(root / "valid.jsonl")], 600, str(root / "tok_other"))
    prepare([str(root / "valid.jsonl")], other, str(root / "valid_other"))
    return {"root": root, "tok": tok, "train": str(root / "train"), "valid": str(root / "valid"),
            "valid_other": str(root / "valid_other"), "train_text": str(root / "train.jsonl")}


@pytest.fixture(scope="session")
def byte_level_bpe(tmp_path_factory, tiny_data):
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style tokenizer.json) trained on the tiny corpus."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(x)["text"] for x in open(tiny_data["train_text"])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("bbpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))
    return str(out)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args, env=None, timeout=600, nproc: int | None = None, check=False):
    """Run `megaslm ARGS` as a plain process, or under torchrun with nproc processes."""
    from megaslm.parallel.dist import free_port

    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "megaslm.cli", *args]
    else:
        cmd = [sys.executable, "-m", "megaslm.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
