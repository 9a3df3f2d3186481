"""Opening a checkpoint's files without being led out of it or stalled.

Every file a load reads (the metadata file and each data file) is opened
with ``O_NOFOLLOW`` — a symbolic link in its place is refused, so nothing
outside the checkpoint directory is ever read through one — and
``O_NONBLOCK``, so a FIFO or device swapped in for it cannot block the open.
The opened descriptor (not the path, which may change between a check and
the open) is then checked to be a regular file. File names come from
validated metadata and never hold a ``/``, so the final component is the only
one a link could be put in; the checkpoint directory itself is the caller's.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from distcp.errors import CorruptCheckpointError

__all__ = ["open_regular_file"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def open_regular_file(path: Path, what: str, *, follow_symlinks: bool = False) -> int:
    """A read-only descriptor for the regular file at ``path``; ``what`` names
    it in errors ("data file", "metadata file"). Raises
    :class:`CorruptCheckpointError` (naming ``path``) if it is missing, a
    symbolic link (unless ``follow_symlinks``: for callers that resolved the
    path inside the checkpoint themselves), or not a regular file."""
    flags = _FLAGS if follow_symlinks else _FLAGS | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _corrupt(path, what, "is missing") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            reason = (
                "is a symbolic link (distcp never follows links out of a checkpoint)"
                if not follow_symlinks
                else "is a loop of symbolic links"
            )
            raise _corrupt(path, what, reason) from None
        if error.errno in (errno.EISDIR, errno.ENOTDIR):
            raise _corrupt(path, what, "is not a regular file") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise _corrupt(path, what, f"is {kind}")
        os.set_blocking(fd, True)  # a regular file: plain reads from here on
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: Path, what: str) -> bytes:
    """The whole content of the regular file at ``path``, opened as
    :func:`open_regular_file` does."""
    fd = open_regular_file(path, what)
    with os.fdopen(fd, "rb") as file:
        return file.read()


def _corrupt(path: Path, what: str, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{what} {path} {reason}", file=str(path), offset=0)
