"""The typed description of a checkpoint, with DCP's names and fields.

These are the in-memory types planners and storage exchange. Their encoding on
disk is ``metadata_file.py``'s job; nothing here is ever pickled to storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch

__all__ = [
    "STATE_DICT_TYPE",
    "STORAGE_TYPES",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageInfo",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
]

STATE_DICT_TYPE: TypeAlias = dict[str, Any]


@dataclass
class ChunkStorageMetadata:
    """One saved chunk of a tensor: a box of the global tensor."""

    offsets: torch.Size
    sizes: torch.Size


@dataclass
class TensorProperties:
    """Properties of a saved tensor. Only ``dtype`` and ``requires_grad`` are
    stored; the others exist for DCP compatibility and are always the defaults
    of a dense CPU tensor."""

    dtype: torch.dtype = field(default_factory=torch.get_default_dtype)
    layout: torch.layout = field(default=torch.strided)
    requires_grad: bool = False
    memory_format: torch.memory_format = field(default=torch.contiguous_format)
    pin_memory: bool = False

    @staticmethod
    def create_from_tensor(tensor: torch.Tensor) -> TensorProperties:
        return TensorProperties(dtype=tensor.dtype, requires_grad=tensor.requires_grad)

    def __reduce__(self) -> tuple[Any, ...]:
        # ``torch.memory_format`` pickles as a global named by whichever module
        # first has it as an attribute; a training script's ``__main__`` (with
        # ``import torch``) can win, and a process with another ``__main__``
        # (the async-save writer process) cannot load it. Plans are pickled
        # between ranks and to that process, so name it explicitly.
        return (
            _tensor_properties,
            (
                self.dtype,
                str(self.layout),
                self.requires_grad,
                str(self.memory_format),
                self.pin_memory,
            ),
        )


def _tensor_properties(
    dtype: torch.dtype, layout: str, requires_grad: bool, memory_format: str, pin_memory: bool
) -> TensorProperties:
    return TensorProperties(
        dtype=dtype,
        layout=getattr(torch, layout.removeprefix("torch.")),
        requires_grad=requires_grad,
        memory_format=getattr(torch, memory_format.removeprefix("torch.")),
        pin_memory=pin_memory,
    )


@dataclass
class TensorStorageMetadata:
    """A saved tensor: its properties, global shape and the chunks that tile it."""

    properties: TensorProperties
    size: torch.Size
    chunks: list[ChunkStorageMetadata]


@dataclass
class BytesStorageMetadata:
    """A saved non-tensor value (stored as bytes in the pickle-free value encoding)."""


STORAGE_TYPES: TypeAlias = TensorStorageMetadata | BytesStorageMetadata


@dataclass(frozen=True)
class MetadataIndex:
    """Names one saved item: a key, and for a tensor chunk its offsets.

    ``index`` is a lookup hint into the chunk list and takes no part in equality.
    """

    fqn: str
    offset: tuple[int, ...] | None = None
    index: int | None = field(hash=False, compare=False, default=None)

    def __init__(
        self,
        fqn: str,
        offset: tuple[int, ...] | torch.Size | list[int] | None = None,
        index: int | None = None,
    ) -> None:
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "offset", None if offset is None else tuple(offset))
        object.__setattr__(self, "index", index)


@dataclass(frozen=True)
class StorageInfo:
    """Where one saved item's bytes are: a file inside the checkpoint, a byte
    range in it, and the crc32c of each ``checksum_block_size`` block of it."""

    relative_path: str
    offset: int
    length: int
    checksums: tuple[int, ...]
    checksum_block_size: int


@dataclass
class StorageMeta:
    """Facts about the storage a save or load runs against."""

    checkpoint_id: str | os.PathLike[str] | None = None
    save_id: str | None = None
    load_id: str | None = None
    modules: list[str] = field(default_factory=list)


@dataclass
class Metadata:
    """The whole description of a checkpoint.

    ``state_dict_metadata`` maps every flattened key to what was saved there;
    ``storage_data`` maps every saved item to its :class:`StorageInfo`;
    ``planner_data`` is the save planner's own record (the default planner
    keeps each flattened key's path into the nested state dict).
    """

    state_dict_metadata: dict[str, STORAGE_TYPES]
    planner_data: Any = None
    storage_data: Any = None
    storage_meta: StorageMeta | None = None
    version: str | None = None
