"""megaslm export never deletes or replaces a file it did not write (megaslm/export_dest.py)."""

from __future__ import annotations

import json

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
