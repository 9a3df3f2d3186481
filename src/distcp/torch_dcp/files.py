"""The data files of a torch DCP checkpoint: each one named by the metadata
must resolve (symlinks followed) to a regular file inside the checkpoint
directory, long enough for every byte range the metadata gives in it.

:func:`check_files` runs once the metadata is read, before any data file is
opened: it refuses a name that resolves outside the directory and a range past
a file's end. A missing file is refused only by :func:`open_checked`, when a
load needs it, so a partial load of a checkpoint that lost an unrelated file
still works, as it does with torch DCP.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from distcp.errors import CheckpointFormatError, CorruptCheckpointError
from distcp.filesystem.safe_open import open_regular_file

__all__ = ["check_files", "open_checked", "resolve_inside"]


def resolve_inside(root: Path, name: str) -> Path:
    """``root / name`` with every symlink resolved; :class:`CheckpointFormatError`
    when that lies outside ``root`` (itself resolved)."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(root / name)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        raise CheckpointFormatError(
            f"torch DCP checkpoint {root}: data file {name!r} resolves to {real}, outside the "
            "checkpoint directory (a symlink out of it): refused"
        )
    return Path(real)


def check_files(root: Path, ranges: Iterable[tuple[str, int, str]]) -> None:
    """Check each ``(file name, end of a byte range, what it holds)``: the file
    resolves inside ``root`` and, where it exists, is a regular file at least
    ``end`` bytes long."""
    furthest: dict[str, tuple[int, str]] = {}
    for name, end, what in ranges:
        if name not in furthest or end > furthest[name][0]:
            furthest[name] = (end, what)
    for name, (end, what) in sorted(furthest.items()):
        path = resolve_inside(root, name)
        try:
            status = path.stat()
        except FileNotFoundError:
            continue  # refused by open_checked if a load needs it
        except OSError as exc:  # a name too long, a loop of symlinks, …
            raise CheckpointFormatError(
                f"torch DCP checkpoint {root}: data file {name!r} cannot be examined: {exc}"
            ) from None
        _check_status(path, status, end, what)


def open_checked(root: Path, name: str, end: int, what: str) -> BinaryIO:
    """Open data file ``name`` for reading, after the checks of :func:`check_files`
    (the file must exist now)."""
    path = resolve_inside(root, name)
    # Resolved inside root above, so a link within the checkpoint is followed;
    # O_NONBLOCK and the descriptor's check keep a FIFO from blocking the load.
    fd = open_regular_file(
        path, f"torch DCP checkpoint {root}: data file ({what} is in it)", follow_symlinks=True
    )
    file = os.fdopen(fd, "rb")
    try:
        _check_status(path, os.fstat(file.fileno()), end, what)
    except BaseException:
        file.close()
        raise
    return file


def _check_status(path: Path, status: os.stat_result, end: int, what: str) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise CorruptCheckpointError(
            f"torch DCP data file {path} is not a regular file", file=str(path), offset=0
        )
    if status.st_size < end:
        raise CorruptCheckpointError(
            f"torch DCP data file {path} is {status.st_size} bytes, but the metadata places "
            f"{what} up to byte {end} (truncated, or an out-of-bounds offset)",
            file=str(path),
            offset=status.st_size,
        )
