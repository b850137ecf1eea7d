"""Checkpoint manifests: what a complete checkpoint holds, so that resume and export check it before loading.

`checkpoints/TAG/manifest.json` is written by rank 0 after every rank has written its files and before
`latest_complete` names TAG:

    {"format": 1, "tag": "step_00000006", "step": 6, "world_size": 2, "layout": {"dp": 2, "tp": 1, "zero_stage": 2},
     "files": {"mp_rank_00_model_states.pt": {"size": 52341, "crc32": "0a1b2c3d"}, ...},
     "written_by": {"pid": 4242, "host": "gpu7"}}   # rank 0 of the launch that committed it

It lists every file of the tag directory (every rank's files, paths relative to the directory) with its size in
bytes; files of at most CHECKSUM_MAX_BYTES also carry the CRC-32 of their content (cheap: a few small files per
rank). Large files are checked by size, which catches the usual damage (a file cut short by a full disk or a
flaky parallel filesystem). Besides, every `*.pt` file written as a zip archive (torch.save's format, DeepSpeed's
default) must open as one: its central directory, at the end of the file, is read, so a cut file fails without
reading the file through.
A checkpoint written before manifests existed has no manifest.json; it gets the zip check only.

`diagnose` is the deep check after a load failed: it reads every `*.pt` file through and checks the CRC-32 that
torch.save stores for each record, to name the damaged file.
"""

from __future__ import annotations

import os
import socket
import zipfile
import zlib
from pathlib import Path

from megaslm.atomic import write_json

MANIFEST = "manifest.json"
FORMAT = 1
CHECKSUM_MAX_BYTES = 8 << 20


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def files_present(tag_dir: Path) -> bool:
    """Whether every file the manifest lists is still there (a checkpoint pruned under a reader is not)."""
    import json

    try:
        listed = json.loads((Path(tag_dir) / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError):  # no manifest (an older checkpoint, or the directory is gone)
        return Path(tag_dir).is_dir()
    return all((Path(tag_dir) / name).exists() for name in listed)


def write_manifest(tag_dir: Path, step: int, world_size: int, layout: dict | None = None) -> dict:
    """Record the files of a finished checkpoint (rank 0, after every rank wrote its files)."""
    tag_dir = Path(tag_dir)
    files = {}
    for p in _files(tag_dir):
        with open(p, "rb") as f:  # size from the open file: fresh even where a network filesystem caches stat
            size = os.fstat(f.fileno()).st_size
        entry = {"size": size}
        if size <= CHECKSUM_MAX_BYTES:
            entry["crc32"] = crc32_of(p)
        files[str(p.relative_to(tag_dir))] = entry
    manifest = {"format": FORMAT, "tag": tag_dir.name, "step": step, "world_size": world_size, "layout": layout,
                "files": files,
                "written_by": {"pid": os.getpid(), "host": socket.gethostname()}}  # which launch (rank 0)
    write_json(tag_dir / MANIFEST, manifest)
    return manifest


def saved_layout(tag_dir: Path) -> dict | None:
    """The layout (dp, tp, zero_stage) the manifest records; None for a checkpoint without one."""
    m, _ = _read_manifest(tag_dir) if has_manifest(tag_dir) else (None, None)
    return (m or {}).get("layout")


def has_manifest(tag_dir: Path) -> bool:
    return (Path(tag_dir) / MANIFEST).is_file()


def _read_manifest(tag_dir: Path) -> tuple[dict | None, str | None]:
    import json

    path = Path(tag_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
        if not isinstance(m.get("files"), dict):
            raise ValueError("no file list")
        return m, None
    except (OSError, ValueError) as e:
        return None, f"{path}: unreadable manifest ({e})"


def verify(tag_dir: Path) -> str | None:
    """None if the checkpoint passes, else one line naming the first damaged or missing file."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"{tag_dir}: directory not found"
    if has_manifest(tag_dir):
        m, problem = _read_manifest(tag_dir)
        if problem:
            return problem
        for rel, entry in sorted(m["files"].items()):
            problem = _check_file(tag_dir / rel, entry)
            if problem:
                return problem
    elif not any(tag_dir.glob("*.pt")):
        return f"{tag_dir}: no checkpoint files"
    for p in sorted(tag_dir.glob("*.pt")):
        problem = _check_zip(p)
        if problem:
            return problem
    return None


def _check_file(path: Path, entry: dict) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing (the manifest lists it)"
    if size != entry["size"]:
        return f"{path}: {size} bytes, the manifest records {entry['size']} (cut short or overwritten)"
    if "crc32" in entry and crc32_of(path) != entry["crc32"]:
        return f"{path}: content differs from the manifest (CRC-32 {crc32_of(path)}, recorded {entry['crc32']})"
    return None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"PK"  # DeepSpeed's `checkpoint_serialization: false` writes torch's legacy format


def _check_zip(path: Path) -> str | None:
    if not _is_zip(path):
        return None
    try:
        with zipfile.ZipFile(path):
            return None
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path}: not a readable torch.save archive ({e})"


def diagnose(tag_dir: Path) -> str | None:
    """After a failed load: the first `*.pt` file whose records fail their CRC-32 (reads every file through)."""
    for p in sorted(Path(tag_dir).glob("*.pt")):
        if not _is_zip(p):
            continue
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            return f"{p}: not a readable torch.save archive ({e})"
        if bad is not None:
            return f"{p}: record {bad} is damaged (CRC-32 mismatch)"
    return None
