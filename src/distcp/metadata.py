"""The typed description of a checkpoint: torch DCP's own vocabulary types.

``Metadata``, ``MetadataIndex``, ``TensorStorageMetadata`` and friends *are*
``torch.distributed.checkpoint.metadata``'s classes, not look-alikes: a planner
or storage class written for torch DCP exchanges them with distcp's without any
conversion, and equality and ``isinstance`` work across the two libraries
(DESIGN §1 allows sharing torch's public vocabulary; converting at every
boundary would be more code and a second place for mismatches to hide).

What distcp adds is :class:`StorageInfo`, the ``storage_data`` its own format
keeps per item. The encoding on disk is ``metadata_file.py``'s job; nothing
here is ever pickled to storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from torch.distributed.checkpoint.metadata import (
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

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


@dataclass(frozen=True)
class StorageInfo:
    """Where one saved item's bytes are: a file inside the checkpoint, a byte
    range in it, the crc32c of each ``checksum_block_size`` block of it, and
    the codec the stored bytes are in (None: the raw bytes; ``"zstd"``)."""

    relative_path: str
    offset: int
    length: int
    checksums: tuple[int, ...]
    checksum_block_size: int
    codec: str | None = None
