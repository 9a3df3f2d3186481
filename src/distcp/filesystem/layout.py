"""Names and atomic file operations of a checkpoint directory.

A checkpoint directory holds data files named ``data-<save_id>-<rank>-<n>.distcp``
and one metadata file, ``.metadata.distcp``, whose presence is what makes the
checkpoint exist. Data file names are unique to a save, so a save never
modifies the files of the checkpoint it replaces.

After the commit, a small text file ``.metadata`` (the *probe*) is written
too: tools that find complete checkpoints by probing ``<dir>/.metadata``
(torchtitan's checkpoint manager and others written for torch DCP) then find
distcp's, and never an incomplete one. It starts with ``#``, so torch DCP's
``pickle.load`` of it fails at once ("invalid load key") without unpickling
anything. distcp's reader never opens it.

A rank-local save (``use_collectives=False``) commits each rank's own metadata
as ``__<rank>.metadata.distcp`` and its probe as ``__<rank>.metadata``, as
torch DCP names its rank-local metadata: one rank's commit says nothing about
the others', so a rank-local save never writes the global ``.metadata``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

__all__ = [
    "METADATA_FILE_NAME",
    "PROBE_FILE_NAME",
    "PROBE_TEXT",
    "data_file_name",
    "fsync_directory",
    "is_data_file_name",
    "is_temporary_metadata_name",
    "metadata_file_name",
    "new_save_id",
    "probe_file_name",
    "temporary_metadata_name",
    "write_atomically",
]

METADATA_FILE_NAME = ".metadata.distcp"
PROBE_FILE_NAME = ".metadata"
PROBE_TEXT = (
    b"# distcp checkpoint: its metadata is in .metadata.distcp; load it with distcp\n"
    b"# (import distcp as dcp), which also reads torch DCP checkpoints.\n"
)
_DATA_FILE = re.compile(r"data-[0-9a-f]{16}-\d{5,}-\d{3,}\.distcp")
# Temporary names of the metadata and the probe, global or a rank's own:
# .metadata.distcp.tmp-<id>, __3.metadata.distcp.tmp-<id>, .metadata.tmp-<id>, ...
_TEMPORARY_METADATA = re.compile(r"(?:__(\d+))?\.metadata(?:\.distcp)?\.tmp-[0-9a-f]{16}")


def metadata_file_name(rank: int | None = None) -> str:
    """The committed metadata's name: the global one, or ``rank``'s own."""
    return METADATA_FILE_NAME if rank is None else f"__{rank}{METADATA_FILE_NAME}"


def probe_file_name(rank: int | None = None) -> str:
    """The probe's name: ``.metadata``, or ``__<rank>.metadata`` beside a
    rank's own metadata (torch DCP's names for its metadata files)."""
    return PROBE_FILE_NAME if rank is None else f"__{rank}{PROBE_FILE_NAME}"


def new_save_id() -> str:
    """A random id, unique to one save, that its data file names carry."""
    return secrets.token_hex(8)


def data_file_name(save_id: str, rank: int, number: int) -> str:
    return f"data-{save_id}-{rank:05d}-{number:03d}.distcp"


def is_data_file_name(name: str) -> bool:
    return bool(_DATA_FILE.fullmatch(name))


def temporary_metadata_name(save_id: str, final_name: str = METADATA_FILE_NAME) -> str:
    return f"{final_name}.tmp-{save_id}"


def is_temporary_metadata_name(name: str, rank: int | None = None) -> bool:
    """Whether ``name`` is a temporary metadata or probe file; with ``rank``,
    only ``rank``'s own rank-local ones (another rank may be committing its
    own at this moment)."""
    match = _TEMPORARY_METADATA.fullmatch(name)
    if match is None:
        return False
    return rank is None or match.group(1) == str(rank)


def fsync_directory(path: Path) -> None:
    """Make renames and creations inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, temporary_name: str, *, sync: bool) -> OSError | None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole
    new one, never a part: write a temporary file, fsync it, rename it into
    place, fsync the directory.

    An error before or at the rename is raised: ``path`` is unchanged. The
    rename is the point of no return: an error after it (fsyncing the
    directory) is *returned*, not raised, because ``path`` already holds the
    new file; only its durability across a power loss is unconfirmed.
    """
    temporary = path.with_name(temporary_name)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            if sync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that matters is the one raised
            temporary.unlink(missing_ok=True)
        raise
    if sync:
        try:
            fsync_directory(path.parent)
        except OSError as error:
            return error
    return None
