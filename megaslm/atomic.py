"""Whole-file writes that never leave a half-written file under the final name.

The data goes to a unique temporary file in the same directory, is flushed to disk, and is renamed over the
target (os.replace is atomic on POSIX): a reader sees the old file or the new one, never a mix.
mkstemp creates the temporary file with mode 0600 whatever the umask; it gets the mode a plain open() would give
(0666 minus the umask) before the rename, so that a team sharing a run directory can read what megaslm writes.
"""

from __future__ import annotations

import json
import os
import tempfile


def umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=True))
