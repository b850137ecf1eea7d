"""I/O failures of a command as one user-facing line.

A full disk, a missing permission or a read-only filesystem is the user's to fix, not a bug: `prepare` and
`score` wrap their work in `io_errors_as_user_errors`, which turns an OSError into a UserError naming the path
and the cause (the CLI prints it as `error: ...` and exits 2). It is caught at the command boundary, not where
the write happens: those places already clean up (temp directories, partial chunks) as the error passes.
"""

from __future__ import annotations

import contextlib
import errno
import os

from megaslm.errors import UserError


def describe(e: OSError) -> str:
    """`No space left on device [ENOSPC]`."""
    name = errno.errorcode.get(e.errno or -1)
    cause = (e.strerror or os.strerror(e.errno)) if e.errno else str(e)
    return f"{cause} [{name}]" if name else cause


@contextlib.contextmanager
def io_errors_as_user_errors(command: str, out: str, kept: str):
    """Re-raise an OSError with an errno as a one-line UserError: `command` failed on the path the error names
    (else `out`), why, and `kept` (what the user still has)."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        path = e.filename or out
        other = f" -> {e.filename2}" if e.filename2 else ""
        where = f" (writing {out})" if str(path) != str(out) else ""
        raise UserError(f"{command}: {path}{other}: {describe(e)}{where}; {kept}") from None
