"""Where `megaslm export` puts its files: it never deletes or replaces a file it did not write.

An export directory carries `megaslm_export.json`, whose "files" lists every file that export wrote (itself
included). `--out DIR` may be new, empty, or an earlier export (every file in it listed by its manifest): the
new export is written under a temporary sibling and swapped in whole. A non-empty DIR holding anything else is
refused in one line naming the directory and a file found there; with `--force` the export's files are moved
in beside the others, and only the previous export's listed files are removed (a foreign file with the name of
one the export writes is still refused: replacing it would delete what the export did not write).
"""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

from megaslm.errors import UserError

MANIFEST = "megaslm_export.json"


def written_files(directory: Path) -> list[str]:
    """Relative paths of the files under `directory` (what an export just wrote), sorted."""
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file() or f.is_symlink())


# What an export wrote before manifests listed their files: the Hugging Face model and tokenizer files.
LEGACY = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
          "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", MANIFEST)


def previous_export(dest: Path) -> set[str]:
    """The files the export manifest in `dest` lists (empty when there is none or it is unreadable); for an
    export written before manifests listed files, its Hugging Face files (LEGACY)."""
    try:
        files = json.loads((dest / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    if files is None:
        return {f for f in written_files(dest) if "/" not in f and any(fnmatch(f, p) for p in LEGACY)}
    return {str(f) for f in files} if isinstance(files, list) else set()


def foreign_files(dest: Path) -> list[str]:
    """Files in `dest` that no earlier export wrote (an old export without a file list counts as foreign)."""
    if not dest.exists():
        return []
    if not dest.is_dir():
        return [""]
    ours = previous_export(dest)
    return [f for f in written_files(dest) if f not in ours]


def _held_run_dir(dest: Path) -> tuple[Path, str] | None:
    """(run directory, holder) when `dest` lies inside a run directory a live run holds the lease of."""
    from megaslm.lease import LEASE_FILE, holder_text, live_holder

    for parent in Path(dest).resolve().parents:
        rec = live_holder(parent / LEASE_FILE)
        if rec:
            return parent, holder_text(rec)
    return None


def check_destination(dest: Path, force: bool) -> None:
    """Refuse `--out` before anything is computed: a file, or a non-empty directory that is not an export."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"export --out {dest}: a file, not a directory; choose a new or empty directory")
    held = _held_run_dir(dest)
    if held:
        raise UserError(f"export --out {dest}: inside the run directory {held[0]}, held by the live run "
                        f"{held[1]}: only that run writes there; export to a directory outside it")
    foreign = foreign_files(dest)
    if foreign and not force:
        raise UserError(f"export --out {dest}: the directory is not empty and is not an earlier export (it holds "
                        f"{foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); choose a new "
                        f"or empty directory, or --force to write the export beside those files (they are kept)")


def place(tmp: Path, dest: Path, force: bool) -> None:
    """Move the finished export `tmp` (its manifest last) to `dest`, as check_destination allowed."""
    check_destination(dest, force)  # again: the directory may have changed while the model was written
    foreign = foreign_files(dest)
    if not foreign:
        old = dest.with_name(dest.name + ".old-export")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return
    new = written_files(tmp)
    clash = sorted(set(new) & set(foreign))
    if clash:
        raise UserError(f"export --out {dest}: {clash[0]} there was not written by an export and the export "
                        f"writes a file of that name; move it away or choose another directory")
    before = previous_export(dest)
    (dest / MANIFEST).unlink(missing_ok=True)  # half-placed files must not read as a complete export
    for rel in new:
        if rel == MANIFEST:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, dest / rel)
    for rel in sorted(before - set(new)):  # the previous export's files the new one does not write
        (dest / rel).unlink(missing_ok=True)
    os.replace(tmp / MANIFEST, dest / MANIFEST)
    shutil.rmtree(tmp, ignore_errors=True)
