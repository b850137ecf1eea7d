"""I/O failures of `megaslm prepare` and `megaslm score` on real filesystems: one line naming the path and the
cause, exit 2, no traceback, the previous good output untouched.

Full disk: a tmpfs of a few hundred KiB mounted for the test (needs root: skipped otherwise). Without root the
kernel's per-process file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes a write fail the same way, as EFBIG.
Read-only filesystem: the same tmpfs remounted read-only."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    """A directory on its own tiny filesystem: yields mount(size) -> path; unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: int, options: str = "") -> Path:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for w in mounted:
        subprocess.run(["umount", str(w)], capture_output=True)


def remount_ro(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def one_line(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
    assert "Traceback" not in res.stderr, res.stderr[-4000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-4000:]
    print(lines[0])
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def prepare(src, tok, out, **kw):
    return run_cli("prepare", "--input", str(src), "--tokenizer", str(tok), "--out", str(out), **kw)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, tiny_data):
    """A few documents: shards of some KiB, where the full training text needs ~300 KiB."""
    p = tmp_path_factory.mktemp("io") / "small.jsonl"
    p.write_text("".join(Path(tiny_data["train_text"]).read_text().splitlines(keepends=True)[:3]))
    return p


def test_prepare_on_a_full_disk_keeps_the_previous_shards(small_disk, tiny_data, small_text):
    disk = small_disk(200 * 1024)
    out = disk / "shards"
    assert prepare(small_text, tiny_data["tok"], out).returncode == 0
    before = snapshot(out)
    line = one_line(prepare(tiny_data["train_text"], tiny_data["tok"], out))
    assert line == f"error: prepare: {out}: No space left on device [ENOSPC]; the shard directory there, if any, " \
                   f"is unchanged"
    assert snapshot(out) == before and sorted(os.listdir(disk)) == ["shards"]  # no temp directory left

    remount_ro(disk)
    line = one_line(prepare(small_text, tiny_data["tok"], out))
    assert line.startswith(f"error: prepare: {disk}/shards.tmp-") or line.startswith(f"error: prepare: {disk}:")
    assert "Read-only file system [EROFS]" in line and f"(writing {out})" in line
    assert snapshot(out) == before


def _file_size_limit(limit: int):
    def child():  # in the child before exec: writes beyond `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return child


def test_prepare_beyond_the_file_size_limit_is_one_line(tmp_path, tiny_data, small_text):
    """No root needed: the kernel refuses writes past RLIMIT_FSIZE (EFBIG) as a full disk refuses them (ENOSPC)."""
    out = tmp_path / "shards"
    assert prepare(small_text, tiny_data["tok"], out).returncode == 0
    before = snapshot(out)
    cmd = [sys.executable, "-m", "megaslm.cli", "prepare", "--input", tiny_data["train_text"], "--tokenizer",
           tiny_data["tok"], "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, preexec_fn=_file_size_limit(64 * 1024),
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    line = one_line(res)
    assert line == f"error: prepare: {out}: File too large [EFBIG]; the shard directory there, if any, is unchanged"
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["shards"]


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from megaslm.model.presets import preset_config

    out = tmp_path_factory.mktemp("io_ref") / "ref"
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(preset_config("tiny", 512)).save_pretrained(out)
    return out


def score_config(tmp_path, data, ref, cache):
    return write_config(tmp_path / "s.yaml", {
        "run": {"dir": str(tmp_path / "run")}, "data": {"train": data["valid"]},
        "train": {"seq_len": 32, "micro_batch_size": 8}, "wandb": {"mode": "disabled"}, "objective": "slm",
        "reference": {"path": str(ref), "placement": "replicated", "cache": str(cache)}})


def test_score_on_a_full_disk_keeps_the_previous_cache(small_disk, tmp_path, tiny_data, reference_model):
    good = tmp_path / "good_cache"
    run_cli("score", str(score_config(tmp_path, tiny_data, reference_model, good)), check=True)
    size = sum(len(b) for b in snapshot(good).values())
    disk = small_disk(int(size * 1.5) + 16 * 1024)  # room for one cache, not for a second one beside it
    cache = disk / "cache"
    shutil.copytree(good, cache)
    before = snapshot(cache)
    res = run_cli("score", str(score_config(tmp_path, tiny_data, reference_model, cache)), "--force")
    line = one_line(res)
    # (numpy's tofile raises without a file name: the line names the output)
    assert line == f"error: score: {cache}: No space left on device [ENOSPC]; the cache there, if any, is " \
                   f"unchanged; a re-run resumes the chunks written"
    assert snapshot(cache) == before
    assert not (disk / "cache.lease.json").exists()  # released on the error
