"""One save at a time per checkpoint directory.

Two saves into one directory at once (a job restarted while the old one
still runs, two jobs given one path) used to both report success and leave
the directory unloadable: each save's cleanup deletes the data files the
other's metadata references. The rank that commits a save therefore holds an
exclusive ``flock`` on a lock file in the directory from the save's set-up to
its end; a second save finds it held and fails at once with
:class:`ConcurrentSaveError` naming the holder, before writing anything.

The kernel releases the lock when its holder exits, however it exits, so a
crashed save never leaves a stale lock. Within one process a new save takes
the lock over from an earlier one that failed without releasing it (a
writer driven by torch's ``dcp.save``, which has no hook for a failed save,
still referenced by the traceback of a retry): the lock tells processes apart,
not saves of one process. The lock file itself stays (deleting
it would race another save opening it); readers ignore it. On a file system
without locks (``ENOLCK``, ``EOPNOTSUPP``) the save goes on unprotected, with
a warning in the log.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
import weakref
from pathlib import Path
from typing import Any

from distcp.errors import ConcurrentSaveError

__all__ = ["DirectoryLock", "lock_file_name"]

log = logging.getLogger("distcp")

#: The lock this process holds on each lock file (by real path), if any.
_held_here: weakref.WeakValueDictionary[str, DirectoryLock] = weakref.WeakValueDictionary()

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def lock_file_name(rank: int | None = None) -> str:
    """``.distcp.lock`` for a collective save; a rank-local save's own
    ``__<rank>.distcp.lock`` (the ranks of one job commit side by side)."""
    return ".distcp.lock" if rank is None else f"__{rank}.distcp.lock"


class DirectoryLock:
    """The exclusive lock one save holds on its directory."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __reduce__(self) -> tuple[type[DirectoryLock], tuple[()]]:
        """A copy (a writer sent to the writer process) holds nothing: the
        lock stays with the process that commits."""
        return (DirectoryLock, ())

    def acquire(self, path: Path) -> None:
        """Take the lock at ``path`` (a lock file), releasing any lock this
        object held before; raises :class:`ConcurrentSaveError` if another
        process holds it."""
        self.release()
        key = os.path.realpath(path)
        earlier = _held_here.get(key)
        if earlier is not None and earlier is not self:
            earlier.release()  # a failed save of this process that never released it
        fd = os.open(path, _FLAGS, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConcurrentSaveError(
                f"another save into {path.parent} is in progress ({holder}); a directory "
                "takes one save at a time. The checkpoint there is untouched: wait for "
                "that save, or save to another path"
            ) from None
        except OSError as error:
            os.close(fd)
            if error.errno not in _UNSUPPORTED:
                raise
            log.warning(
                "distcp: %s cannot be locked (%s); concurrent saves into it are not detected",
                path.parent,
                error,
            )
            return
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now}\n".encode(), 0)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)  # a writer dropped mid-save
        _held_here[key] = self

    def release(self) -> None:
        """Let the next save in (closing the descriptor drops the flock)."""
        if self._fd is None:
            return
        assert self._finalizer is not None
        self._finalizer.detach()
        self._finalizer = None
        fd, self._fd = self._fd, None
        os.close(fd)
