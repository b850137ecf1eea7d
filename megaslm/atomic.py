"""Crash-safe file handling, one copy for the whole project.

- Whole-file writes (`write_bytes`, `write_text`, `write_json`) never leave a half-written file under the final
  name: the data goes to a temporary file in the same directory, is flushed and fsynced, and is renamed over the
  target (os.replace is atomic on POSIX): a reader sees the old file or the new one, never a mix. Temporary files
  are created with mode 0o666 minus the umask, as any other file, so the result honours the umask.
- Directory swaps (`swap_dir`): a shard set or a reference cache is built in a work directory beside its target
  and renamed into place whole; a previous directory there is moved aside first and deleted after, and only
  when `replaceable` says it is one of ours (`is_replaceable`): anything else is the user's and is left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from typing import Callable

from megaslm.errors import UserError


def umask() -> int:
    """The process's umask (reading it means setting it: it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, *, temp_suffix: str | None = None) -> None:
    """temp_suffix: a fixed temporary name (path + suffix) for a file only one process writes, so that a
    leftover of a crashed write is recognised and removed on resume (the score's chunks use ".partial");
    default: a unique name."""
    path = os.fspath(path)
    tmp = path + (temp_suffix or f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if temp_suffix else os.O_EXCL)
    fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, **kw) -> None:
    write_bytes(path, text.encode("utf-8"), **kw)


def write_json(path: str | os.PathLike, obj, indent: int = 2, sort_keys: bool = True, **kw) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), **kw)


def is_replaceable(path: str | os.PathLike, ours: Callable[[str], bool]) -> bool:
    """Absent, an empty directory, or a directory whose every entry name `ours` accepts."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return True
    if not os.path.isdir(path):
        return False
    return all(ours(n) for n in os.listdir(path))


def work_dir(out: str | os.PathLike) -> str:
    """A new, uniquely named directory beside `out` to build it in (mode 0o777 minus the umask, unlike mkdtemp's
    0o700: once swapped in it is the result)."""
    out = os.fspath(out)
    while True:
        path = f"{out}.tmp-{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue


def swap_dir(work: str | os.PathLike, out: str | os.PathLike, ours: Callable[[str], bool], refusal: str) -> None:
    """Rename the finished directory `work` to `out`, replacing a previous one that `ours` recognises; else raise
    UserError(refusal) (checked again here: something may have appeared there meanwhile)."""
    work, out = os.fspath(work), os.fspath(out)
    if not is_replaceable(out, ours):
        raise UserError(refusal)
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
