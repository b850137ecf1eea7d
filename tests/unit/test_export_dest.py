"""megaslm export never deletes or replaces a file it did not write (megaslm/export_dest.py)."""

from __future__ import annotations

import json
import os

import pytest

from megaslm.errors import UserError
from megaslm.export_dest import MANIFEST, check_destination, place, written_files


def fake_export(tmp, files: dict[str, str]):
    """A finished export under `tmp`, as export() leaves it before place(): its files and a manifest listing them."""
    tmp.mkdir()
    for rel, text in files.items():
        (tmp / rel).write_text(text)
    (tmp / MANIFEST).write_text(json.dumps({"files": sorted({*written_files(tmp), MANIFEST})}))
    return tmp


def test_a_foreign_file_is_refused_naming_the_directory_and_the_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError) as e:
        check_destination(out, force=False)
    print(e.value)
    assert str(e.value).startswith(f"export --out {out}: the directory is not empty and is not an earlier export "
                                   f"(it holds notes.txt)")
    with pytest.raises(UserError, match="a file, not a directory"):
        check_destination(out / "notes.txt", force=False)


def test_an_earlier_export_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    place(fake_export(tmp_path / "a", {"config.json": "1", "old.bin": "x"}), out, force=False)
    place(fake_export(tmp_path / "b", {"config.json": "2"}), out, force=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MANIFEST]
    assert (out / "config.json").read_text() == "2"


def test_force_keeps_foreign_files_and_replaces_only_the_exports_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    place(fake_export(tmp_path / "a", {"config.json": "1", "old.bin": "x"}), out, force=True)
    place(fake_export(tmp_path / "b", {"config.json": "2"}), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MANIFEST, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").read_text() == "2"
    # Without --force the export beside a foreign file is still refused; a foreign file of an export's name always.
    with pytest.raises(UserError, match="holds notes.txt"):
        check_destination(out, force=False)
    (out / "model.safetensors").write_text("user's")
    with pytest.raises(UserError, match="model.safetensors there was not written by an export"):
        place(fake_export(tmp_path / "c", {"model.safetensors": "w"}), out, force=True)
    assert (out / "model.safetensors").read_text() == "user's"


def test_a_checkpoint_pruned_while_export_reads_it_names_the_pruning_run(tmp_path, monkeypatch):
    """The run prunes the checkpoint export is reading: one line naming the live run, not 'damaged'."""
    import shutil

    from transformers import LlamaConfig

    from megaslm import export
    from megaslm.lease import Lease

    run = tmp_path / "run"
    tag_dir = run / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tag_dir / "manifest.json").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": {"size": 1}}}))
    (run / "config.yaml").write_text("data: {train: x}\n")
    LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=32).save_pretrained(run / "hf_config")
    lease = Lease(run / "lease.json", f"run directory {run}")
    lease.acquire()

    def pruned_while_read(ckpt_root, tag, run_dir):
        shutil.rmtree(ckpt_root / tag)
        raise FileNotFoundError(ckpt_root / tag / "mp_rank_00_model_states.pt")

    monkeypatch.setattr(export, "verified_tag", lambda root, tag: "step_00000002")
    monkeypatch.setattr(export, "consolidated_state_dict", pruned_while_read)
    with pytest.raises(UserError) as e:
        export.load_run_model(run)
    lease.release()
    print(e.value)
    assert str(e.value).startswith(f"checkpoint step_00000002 in {run / 'checkpoints'} went away while it was read: "
                                   f"the live run pid {os.getpid()} on host ")
    assert "keeping its newest train.keep_checkpoints checkpoints" in str(e.value)


def test_an_export_into_a_run_directory_a_live_run_holds_is_refused(tmp_path):
    from megaslm.lease import Lease

    lease = Lease(tmp_path / "run" / "lease.json", "run directory R")
    lease.acquire()
    try:
        with pytest.raises(UserError) as e:
            check_destination(tmp_path / "run" / "hf", force=True)
    finally:
        lease.release()
    assert str(e.value).startswith(f"export --out {tmp_path / 'run' / 'hf'}: inside the run directory "
                                   f"{tmp_path / 'run'}, held by the live run pid {os.getpid()} on host ")
    check_destination(tmp_path / "run" / "hf", force=False)  # released: allowed


def test_an_export_written_before_file_lists_is_still_an_export(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_text("old")
    (out / MANIFEST).write_text(json.dumps({"run_dir": "r", "tag": "step_00000002"}))  # no "files"
    check_destination(out, force=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt"):
        check_destination(out, force=False)
