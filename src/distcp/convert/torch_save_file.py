"""Reading a ``torch.save`` file as a state dict, safely and with typed errors.

The file is unpickled with ``weights_only=True`` (tensors, containers and plain
values only: loading never runs code from it) and memory-mapped when its format
allows, so a large file's tensors stay in the page cache until they are used
instead of being copied into process memory all at once.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from distcp.errors import CheckpointFormatError, CheckpointNotFoundError, PickleNotAllowedError

__all__ = ["load_torch_save"]


def load_torch_save(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state dict held by the ``torch.save`` file at ``path``, on the CPU.

    Raises :class:`CheckpointNotFoundError` when there is no file,
    :class:`PickleNotAllowedError` when the file holds objects that only a full
    (code-running) unpickle could build, and :class:`CheckpointFormatError` when
    it is not a ``torch.save`` file or does not hold a dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no torch.save file at {path}: the path does not exist")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"{path} is not a file; a torch.save checkpoint is one file (a DCP checkpoint is a "
            "directory: read it with distcp.FileSystemReader)"
        )
    # The zip format (torch.save's default since 1.6) can be mapped; the legacy one cannot.
    mmap = zipfile.is_zipfile(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        detail = _unpickler_detail(str(error))
        if "unsupported global" in detail.lower():
            raise PickleNotAllowedError(
                f"{path} holds objects other than tensors, containers and plain values; "
                "distcp reads torch.save files with weights_only=True and never runs code from "
                f"them ({detail})"
            ) from error
        raise CheckpointFormatError(
            f"{path} is not a readable torch.save file ({detail})"
        ) from error
    except Exception as error:
        raise CheckpointFormatError(
            f"{path} is not a readable torch.save file: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(loaded, Mapping):
        raise CheckpointFormatError(
            f"{path} holds a {type(loaded).__name__}, not a state dict (a dict of tensors and "
            "values)"
        )
    bad = [key for key in loaded if not isinstance(key, str)]
    if bad:
        raise CheckpointFormatError(
            f"{path}: a state dict's top-level keys must be strings, found {bad[:5]!r}"
        )
    return dict(loaded)


def _unpickler_detail(message: str) -> str:
    """The part of torch's (long) weights-only message that says what failed."""
    marker = "WeightsUnpickler error:"
    if marker in message:
        rest = message.split(marker, 1)[1].strip()
        return rest.split("\n\n", 1)[0].split(". Please use", 1)[0].strip() or message
    return message.strip().splitlines()[0] if message.strip() else "unpickling failed"
