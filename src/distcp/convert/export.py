"""Converting any checkpoint into any format, streaming: one tensor in
memory at a time, whatever the size of the state.

:func:`convert` reads the source through :mod:`distcp.convert.sources`
(distcp, torch DCP, ``torch.save``, safetensors: detected) and writes

- ``"distcp"``: a distcp checkpoint (every tensor one whole chunk; any layout
  loads from it);
- ``"dcp"``: torch DCP's own format (``torch.distributed.checkpoint.FileSystemWriter``),
  for tools that read only that;
- ``"torch"``: one ``torch.save`` file of the nested state dict (full tensors);
- ``"safetensors"``: Hugging Face safetensors, sharded by ``max_shard_size``
  with ``model.safetensors.index.json`` (tensors only: values are left out
  and counted).

``keys`` (globs) choose what is converted, ``dtype`` casts floating-point
tensors, ``strip_prefix``/``add_prefix`` rename keys (safetensors and torch
outputs: ``model.`` → Hugging Face names). An existing destination is refused
unless ``overwrite``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distcp.api import save
from distcp.convert.buffers import transient_tensor
from distcp.convert.full_state import nest_state_dict
from distcp.convert.safetensors_format import INDEX_FILE_NAME, write_sharded
from distcp.convert.sources import Source, TensorInfo, open_source, select_keys
from distcp.convert.torch_save_writer import TensorStandIn, write_torch_save
from distcp.errors import CheckpointArgumentError, CheckpointExistsError
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.filesystem.writer import FileSystemWriter
from distcp.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from distcp.planner import (
    BytesIOWriteData,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from distcp.save_planner import DefaultSavePlanner
from distcp.value_codec import encode_value

__all__ = ["TARGETS", "Conversion", "convert"]

TARGETS = ("distcp", "dcp", "torch", "safetensors")


@dataclass
class Conversion:
    """What :func:`convert` did."""

    source_format: str
    target: str
    written: list[Path] = field(default_factory=list)
    tensors: int = 0
    values: int = 0
    tensor_bytes: int = 0
    skipped_values: list[str] = field(default_factory=list)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str,
    keys: list[str] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
    strip_prefix: str | None = None,
    add_prefix: str | None = None,
    overwrite: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> Conversion:
    """Convert the checkpoint at ``src`` into ``to`` at ``dst``; see the module docstring."""
    if to not in TARGETS:
        raise CheckpointArgumentError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    source = open_source(src)
    destination = Path(dst)
    _check_destination(source, destination, to, overwrite)
    chosen = select_keys(source.keys, keys, where=str(source.location))
    tensors = [key for key in chosen if key in source.tensors]
    values = [key for key in chosen if key not in source.tensors]
    rename = _renamer(strip_prefix, add_prefix)
    shapes = {key: _cast_info(source.tensors[key], dtype) for key in tensors}

    def fetch(key: str) -> torch.Tensor:
        tensor = source.read_tensor(key)
        target = shapes[key].dtype
        if tensor.dtype != target:
            cast = transient_tensor(tensor.shape, target)
            cast.copy_(tensor)
            tensor = cast
        if on_progress is not None:
            on_progress(tensor.nbytes)
        return tensor

    result = Conversion(source.kind, to, tensors=len(tensors), values=len(values))
    result.tensor_bytes = sum(info.nbytes for info in shapes.values())
    if to == "safetensors":
        result.skipped_values = values
        result.values = 0
        names = {rename(key): key for key in tensors}
        if len(names) != len(tensors):
            raise CheckpointArgumentError("renaming the keys made two of them equal")
        if overwrite and destination.exists():
            _clear_safetensors(destination)
        entries = [(name, shapes[key].dtype, shapes[key].shape) for name, key in names.items()]
        result.written = write_sharded(
            destination, entries, lambda name: fetch(names[name]), max_shard_size
        )
    elif to == "torch":
        flat: dict[str, Any] = {
            key: TensorStandIn(key, shapes[key].dtype, shapes[key].shape) for key in tensors
        }
        flat.update({key: source.read_value(key) for key in values})
        paths = {key: _renamed_path(source.paths.get(key, [key]), rename) for key in flat}
        write_torch_save(destination, nest_state_dict(flat, paths), fetch)
        result.written = [destination]
    else:
        planner = StreamingSavePlanner(
            source, tensors, values, shapes, fetch, torch_values=to == "dcp"
        )
        if to == "distcp":
            writer: Any = FileSystemWriter(destination, overwrite=overwrite, thread_count=1)
        else:
            from torch.distributed.checkpoint.filesystem import (
                FileSystemWriter as TorchFileSystemWriter,
            )

            writer = TorchFileSystemWriter(destination, thread_count=1, overwrite=overwrite)
        save({}, storage_writer=writer, planner=planner, no_dist=True)
        result.written = [destination]
    return result


def _cast_info(info: TensorInfo, dtype: torch.dtype | None) -> TensorInfo:
    if dtype is None or not info.dtype.is_floating_point:
        return info
    return TensorInfo(dtype, info.shape)


def _renamer(strip: str | None, add: str | None) -> Callable[[str], str]:
    def rename(key: str) -> str:
        if strip and key.startswith(strip):
            key = key[len(strip) :]
        return f"{add or ''}{key}"

    return rename


def _renamed_path(path: list[str | int], rename: Callable[[str], str]) -> list[str | int]:
    dotted = ".".join(str(step) for step in path)
    renamed = rename(dotted)
    if renamed == dotted:
        return list(path)
    return [renamed]


def _check_destination(source: Source, destination: Path, to: str, overwrite: bool) -> None:
    if destination.exists() and destination.resolve() == source.location.resolve():
        raise CheckpointArgumentError(f"cannot convert {source.location} into itself")
    if not destination.exists():
        return
    if to == "torch" and destination.is_dir():
        raise CheckpointExistsError(f"{destination} is a directory; --to torch writes one file")
    if to != "torch" and not destination.is_dir():
        raise CheckpointExistsError(f"{destination} exists and is not a directory")
    occupied = destination.is_file() or any(destination.iterdir())
    if occupied and not overwrite:
        raise CheckpointExistsError(
            f"{destination} exists; pass --overwrite (overwrite=True) to replace it"
        )
    if to in ("distcp", "dcp") and occupied:
        holds = (destination / METADATA_FILE_NAME).exists() or (destination / ".metadata").exists()
        if not holds:
            raise CheckpointExistsError(
                f"{destination} holds files that are not a checkpoint; choose an empty directory"
            )


def _clear_safetensors(folder: Path) -> None:
    """Remove an earlier export's files (only those) before a new one."""
    for path in folder.glob("*.safetensors"):
        path.unlink()
    (folder / INDEX_FILE_NAME).unlink(missing_ok=True)


class StreamingSavePlanner(DefaultSavePlanner):
    """Plans a save of a source's keys (each tensor one whole chunk) and
    reads each from the source only when the storage writer resolves it."""

    def __init__(
        self,
        source: Source,
        tensors: list[str],
        values: list[str],
        shapes: dict[str, TensorInfo],
        fetch: Callable[[str], torch.Tensor],
        *,
        torch_values: bool,
    ) -> None:
        super().__init__(flatten_state_dict=False)
        self.source = source
        self.tensor_keys, self.value_keys = tensors, values
        self.shapes, self.fetch = shapes, fetch
        self.torch_values = torch_values

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        for key in self.tensor_keys:
            info = self.shapes[key]
            zeros = torch.Size([0] * len(info.shape))
            data = TensorWriteData(
                ChunkStorageMetadata(zeros, torch.Size(info.shape)),
                TensorProperties(dtype=info.dtype),
                torch.Size(info.shape),
            )
            items.append(
                WriteItem(MetadataIndex(key, zeros), WriteItemType.TENSOR, tensor_data=data)
            )
        for key in self.value_keys:
            items.append(
                WriteItem(
                    MetadataIndex(key), WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(0)
                )
            )
        paths = {key: list(self.source.paths.get(key, [key])) for key in self.source.keys}
        return SavePlan(items, planner_data=paths)

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            value = self.source.read_value(key)
            if self.torch_values:  # torch DCP's own encoding of a value
                buffer = io.BytesIO()
                torch.save(value, buffer)
                buffer.seek(0)
                return buffer
            return io.BytesIO(encode_value(value, key=key))
        return self.fetch(key)
