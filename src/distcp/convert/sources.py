"""Any checkpoint, opened for reading one tensor or value at a time.

:func:`open_source` detects the format of a path — a distcp checkpoint, a
torch DCP checkpoint, a ``torch.save`` file, a safetensors file or folder —
and returns a :class:`Source`: the keys with their dtypes and shapes, and
``read_tensor(key)`` / ``read_value(key)`` that read just that key (a
sharded tensor's chunks assembled into the full tensor). Converters and the
command line read through it, so they hold one tensor at a time.
"""

from __future__ import annotations

import fnmatch
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distcp.convert.safetensors_format import INDEX_FILE_NAME
from distcp.convert.streaming import _SourceItems
from distcp.convert.torch_save_file import load_torch_save
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
)
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.filesystem.reader import FileSystemReader
from distcp.flatten import flatten_state_dict
from distcp.metadata import Metadata, TensorStorageMetadata
from distcp.storage import StorageReader

__all__ = ["Source", "TensorInfo", "detect_format", "open_source", "select_keys"]

FORMATS = ("distcp", "torch-dcp", "torch.save", "safetensors")


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def detect_format(path: str | os.PathLike[str]) -> str:
    """``distcp``, ``torch-dcp``, ``torch.save`` or ``safetensors``; raises
    :class:`CheckpointNotFoundError` when nothing is there and
    :class:`IncompleteCheckpointError` for a directory without a committed
    checkpoint."""
    location = Path(path)
    if location.is_dir():
        if (location / METADATA_FILE_NAME).exists():
            return "distcp"
        if (location / ".metadata").exists():
            return "torch-dcp"
        if (location / INDEX_FILE_NAME).exists() or any(location.glob("*.safetensors")):
            return "safetensors"
        raise IncompleteCheckpointError(
            f"{location} holds no committed checkpoint (no {METADATA_FILE_NAME}, .metadata "
            "or *.safetensors in it)"
        )
    if location.is_file():
        if location.suffix == ".safetensors":
            return "safetensors"
        if zipfile.is_zipfile(location) or location.suffix in (".pt", ".pth", ".bin"):
            return "torch.save"
        with open(location, "rb") as file:
            head = file.read(2)
        if head[:1] == b"\x80":  # a legacy (pre-zip) torch.save pickle
            return "torch.save"
        raise CheckpointNotFoundError(f"{location} is not a checkpoint file (not torch.save)")
    raise CheckpointNotFoundError(f"no checkpoint at {location}: the path does not exist")


class Source:
    """A checkpoint's keys, readable one at a time; see the module docstring."""

    def __init__(
        self,
        kind: str,
        location: Path,
        tensors: dict[str, TensorInfo],
        values: list[str],
        paths: dict[str, list[str | int]],
    ) -> None:
        self.kind = kind
        self.location = location
        self.tensors = tensors
        self.values = values
        self.paths = paths

    def read_tensor(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_value(self, key: str) -> Any:
        raise NotImplementedError

    @property
    def keys(self) -> list[str]:
        return [*self.tensors, *self.values]


class _ReaderSource(Source):
    """A checkpoint a storage reader reads (distcp, torch DCP, safetensors):
    every read goes through the reader's protocol (a distcp one verifies)."""

    def __init__(self, kind: str, location: Path, reader: StorageReader) -> None:
        metadata: Metadata = reader.read_metadata()
        reader.set_up_storage_reader(metadata, True)
        tensors, values = {}, []
        for key, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, TensorStorageMetadata):
                tensors[key] = TensorInfo(entry.properties.dtype, tuple(entry.size))
            else:
                values.append(key)
        recorded = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        paths: dict[str, list[str | int]] = {}
        for key in metadata.state_dict_metadata:
            path = recorded.get(key)
            paths[key] = list(path) if isinstance(path, (list, tuple)) else [key]
        super().__init__(kind, location, tensors, values, paths)
        self.metadata = metadata
        self.reader = reader
        self._items = _SourceItems(reader, metadata)

    def read_tensor(self, key: str) -> torch.Tensor:
        return self._items.read_full(key)

    def read_value(self, key: str) -> Any:
        return self._items.read_value(key)


class _MappingSource(Source):
    """A ``torch.save`` file, memory-mapped and read with ``weights_only=True``."""

    def __init__(self, location: Path) -> None:
        flat, paths = flatten_state_dict(load_torch_save(location))
        tensors = {
            key: TensorInfo(value.dtype, tuple(value.shape))
            for key, value in flat.items()
            if isinstance(value, torch.Tensor)
        }
        values = [key for key, value in flat.items() if not isinstance(value, torch.Tensor)]
        steps: dict[str, list[str | int]] = {key: list(path) for key, path in paths.items()}
        super().__init__("torch.save", location, tensors, values, steps)
        self._flat = flat

    def read_tensor(self, key: str) -> torch.Tensor:
        tensor = self._flat[key]
        assert isinstance(tensor, torch.Tensor)
        return tensor.detach()

    def read_value(self, key: str) -> Any:
        return self._flat[key]


def open_source(path: str | os.PathLike[str], *, verify_checksums: bool = True) -> Source:
    """The checkpoint at ``path``, whatever its format (:func:`detect_format`)."""
    location = Path(path)
    kind = detect_format(location)
    if kind == "torch.save":
        return _MappingSource(location)
    if kind == "safetensors":
        from distcp.safetensors_storage import SafetensorsReader

        return _ReaderSource(kind, location, SafetensorsReader(location))
    return _ReaderSource(
        kind, location, FileSystemReader(location, verify_checksums=verify_checksums)
    )


def select_keys(keys: list[str], patterns: list[str] | None, *, where: str) -> list[str]:
    """The keys matching any of the glob ``patterns`` (all when None); a
    pattern that matches nothing is an error naming it."""
    if not patterns:
        return list(keys)
    chosen: list[str] = []
    for pattern in patterns:
        matched = [key for key in keys if fnmatch.fnmatchcase(key, pattern)]
        if not matched:
            raise CheckpointArgumentError(f"--keys {pattern!r} matches no key of {where}")
        chosen.extend(key for key in matched if key not in chosen)
    return [key for key in keys if key in chosen]
