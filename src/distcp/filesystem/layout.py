"""Names and atomic file operations of a checkpoint directory.

A checkpoint directory holds data files named ``data-<save_id>-<rank>-<n>.distcp``
and one metadata file, ``.metadata.distcp``, whose presence is what makes the
checkpoint exist. Data file names are unique to a save, so a save never
modifies the files of the checkpoint it replaces.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

__all__ = [
    "METADATA_FILE_NAME",
    "data_file_name",
    "fsync_directory",
    "is_data_file_name",
    "is_temporary_metadata_name",
    "new_save_id",
    "temporary_metadata_name",
    "write_atomically",
]

METADATA_FILE_NAME = ".metadata.distcp"
_DATA_FILE = re.compile(r"data-[0-9a-f]{16}-\d{5,}-\d{3,}\.distcp")
_TEMPORARY_METADATA = re.compile(re.escape(METADATA_FILE_NAME) + r"\.tmp-[0-9a-f]{16}")


def new_save_id() -> str:
    """A random id, unique to one save, that its data file names carry."""
    return secrets.token_hex(8)


def data_file_name(save_id: str, rank: int, number: int) -> str:
    return f"data-{save_id}-{rank:05d}-{number:03d}.distcp"


def is_data_file_name(name: str) -> bool:
    return bool(_DATA_FILE.fullmatch(name))


def temporary_metadata_name(save_id: str) -> str:
    return f"{METADATA_FILE_NAME}.tmp-{save_id}"


def is_temporary_metadata_name(name: str) -> bool:
    return bool(_TEMPORARY_METADATA.fullmatch(name))


def fsync_directory(path: Path) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, temporary_name: str, *, sync: bool) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole
    new one, never a part: write a temporary file, fsync it, rename it into
    place, fsync the directory."""
    temporary = path.with_name(temporary_name)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync:
        fsync_directory(path.parent)
