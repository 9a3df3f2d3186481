"""Starting the disk write of a file's dirty pages early, without waiting.

A save that fsyncs each data file at its end leaves the page cache holding the
whole file until then, and the disk idle while checksums and copies run.
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` asks Linux to start writing a range
back now and returns at once, so the final ``fsync`` finds most of the file on
its way to disk already. It promises nothing about durability: the ``fsync``
still does that. Elsewhere (no such call) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

__all__ = ["start_writeback"]

_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing bytes ``[offset, offset + length)`` of ``fd`` to disk; best
    effort (errors surface at the ``fsync`` that follows)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
