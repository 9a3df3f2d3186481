"""``distcp ls``: the ``step-<N>`` checkpoints under a root, committed or not."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distcp.errors import CheckpointNotFoundError
from distcp.filesystem.layout import METADATA_FILE_NAME, is_data_file_name
from distcp.manager.steps import STEP_NAME

__all__ = ["list_checkpoints"]


def list_checkpoints(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One entry per ``step-<N>`` directory under ``root``, by step:
    ``state`` is ``committed`` (distcp metadata), ``torch-dcp`` (torch DCP's
    ``.metadata``), ``incomplete`` (data files but no committed metadata) or
    ``empty``; with its size in bytes and age in seconds."""
    base = Path(root)
    if not base.is_dir():
        raise CheckpointNotFoundError(f"{base} is not a directory")
    now = time.time()
    found = []
    for entry in base.iterdir():
        match = STEP_NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        files = [f for f in entry.iterdir() if f.is_file() and not f.is_symlink()]
        names = {f.name for f in files}
        if METADATA_FILE_NAME in names:
            state = "committed"
            stamp = (entry / METADATA_FILE_NAME).stat().st_mtime
        elif ".metadata" in names:
            state = "torch-dcp"
            stamp = (entry / ".metadata").stat().st_mtime
        else:
            state = "incomplete" if any(is_data_file_name(n) for n in names) else "empty"
            stamp = entry.stat().st_mtime
        found.append(
            {
                "step": int(match.group(1)),
                "path": str(entry),
                "state": state,
                "bytes": sum(f.stat().st_size for f in files),
                "age_s": max(0.0, now - stamp),
            }
        )
    return sorted(found, key=lambda item: item["step"])
