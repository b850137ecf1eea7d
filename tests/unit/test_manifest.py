"""Checkpoint manifests: what verify() catches, read back from real torch.save files (no DeepSpeed)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megaslm.train import manifest


def _tag(tmp_path, big_bytes=0):
    d = tmp_path / "step_00000004"
    d.mkdir()
    torch.save({"w": torch.arange(1000.0)}, d / "mp_rank_00_model_states.pt")
    torch.save({"rng": torch.arange(10)}, d / "rng_rank00000.pt")
    if big_bytes:
        torch.save({"m": torch.zeros(big_bytes // 4)}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return d


def test_manifest_records_every_file_and_a_clean_checkpoint_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CHECKSUM_MAX_BYTES", 64 << 10)
    d = _tag(tmp_path, big_bytes=256 << 10)
    m = manifest.write_manifest(d, 4, 2)
    on_disk = json.loads((d / manifest.MANIFEST).read_text())
    assert on_disk == m and m["step"] == 4 and m["world_size"] == 2
    assert set(m["files"]) == {p.name for p in d.iterdir() if p.name != manifest.MANIFEST}
    for name, entry in m["files"].items():
        assert entry["size"] == (d / name).stat().st_size
    big = m["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert "crc32" not in big  # large files: size only
    assert m["files"]["rng_rank00000.pt"]["crc32"] == manifest.crc32_of(d / "rng_rank00000.pt")
    assert manifest.verify(d) is None


def test_truncated_file_is_named(tmp_path):
    d = _tag(tmp_path)
    manifest.write_manifest(d, 4, 1)
    f = d / "mp_rank_00_model_states.pt"
    size = f.stat().st_size
    os.truncate(f, size // 2)
    problem = manifest.verify(d)
    assert str(f) in problem and f"{size // 2} bytes" in problem and f"records {size}" in problem


def test_same_size_damage_of_a_small_file_fails_its_checksum(tmp_path):
    d = _tag(tmp_path)
    manifest.write_manifest(d, 4, 1)
    f = d / "rng_rank00000.pt"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    problem = manifest.verify(d)
    assert str(f) in problem and "CRC-32" in problem
    # The deep check after a failed load finds it too, from the CRC torch.save stores per record.
    assert str(f) in manifest.diagnose(d)


def test_missing_file_and_unreadable_manifest(tmp_path):
    d = _tag(tmp_path)
    manifest.write_manifest(d, 4, 1)
    (d / "rng_rank00000.pt").unlink()
    assert "rng_rank00000.pt: missing" in manifest.verify(d)
    (d / manifest.MANIFEST).write_text("{not json")
    assert "unreadable manifest" in manifest.verify(d)


def test_checkpoint_without_manifest_gets_the_zip_check(tmp_path):
    d = _tag(tmp_path)
    assert not manifest.has_manifest(d) and manifest.verify(d) is None
    f = d / "mp_rank_00_model_states.pt"
    os.truncate(f, f.stat().st_size - 100)
    problem = manifest.verify(d)
    assert str(f) in problem and "not a readable torch.save archive" in problem
    with pytest.raises(Exception):
        torch.load(f)  # what resume ran into before: a traceback instead of a named file
