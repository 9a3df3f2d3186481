"""Streaming conversion of a checkpoint into distcp's format, one item at a time.

The source is any checkpoint :class:`distcp.FileSystemReader` reads (a torch DCP
one, or a distcp one to re-encode). The conversion is a save whose planner
takes its items from the source's metadata instead of from a state dict, and
whose ``resolve_data`` reads just the requested chunk or value from the source
when the writer asks for it. The writer writes items one after the other from
one thread, so at any moment only a few chunks are in memory: the peak is a
small multiple of the largest chunk, never the whole state.

The destination keeps the source's keys, chunk geometry, tensor properties and
saved paths, so it loads exactly as the source did; every chunk is verified
against the source's checksums as it is read (distcp sources).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import torch

from distcp.api import save
from distcp.convert.buffers import transient_tensor
from distcp.errors import CheckpointError, CheckpointExistsError
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.filesystem.reader import FileSystemReader
from distcp.filesystem.writer import FileSystemWriter
from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from distcp.planner import (
    BytesIOWriteData,
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from distcp.save_planner import DefaultSavePlanner
from distcp.storage import StorageReader, wait_future
from distcp.torch_dcp import is_torch_dcp_checkpoint
from distcp.value_codec import encode_value

__all__ = ["SourceReadingSavePlanner", "convert_to_distcp"]


def convert_to_distcp(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Metadata:
    """Write the checkpoint at ``src_dir`` (torch DCP or distcp) as a distcp
    checkpoint at ``dst_dir``, streaming: peak extra memory is a few of the
    source's largest chunks, whatever the size of the state. No process group.

    Returns the new checkpoint's metadata. Raises
    :class:`~distcp.CheckpointNotFoundError` / :class:`~distcp.IncompleteCheckpointError`
    when ``src_dir`` holds no checkpoint, and :class:`~distcp.CheckpointExistsError`
    when ``dst_dir`` holds one and ``overwrite`` is False (a torch DCP checkpoint
    there is never replaced: distcp removes only its own files).
    """
    source, destination = Path(src_dir), Path(dst_dir)
    reader = FileSystemReader(source)
    metadata = reader.read_metadata()
    _check_destination(source, destination, overwrite)
    reader.set_up_storage_reader(metadata, True)
    # One writer thread: each thread keeps an item or two in memory ahead of its file.
    writer = FileSystemWriter(destination, overwrite=overwrite, thread_count=1)
    planner = SourceReadingSavePlanner(reader, metadata)
    return save({}, storage_writer=writer, planner=planner, no_dist=True)


def _check_destination(source: Path, destination: Path, overwrite: bool) -> None:
    if destination.exists() and source.resolve() == destination.resolve():
        raise CheckpointError(
            f"cannot convert {source} into itself: choose another destination directory"
        )
    if destination.exists() and not destination.is_dir():
        raise CheckpointExistsError(f"{destination} exists and is not a directory")
    if is_torch_dcp_checkpoint(destination) and not (destination / METADATA_FILE_NAME).exists():
        raise CheckpointExistsError(
            f"{destination} holds a torch DCP checkpoint (.metadata); distcp "
            "replaces only its own checkpoints: remove it or choose another directory"
        )
    if not overwrite and (destination / METADATA_FILE_NAME).exists():
        raise CheckpointExistsError(
            f"a committed checkpoint exists at {destination} and overwrite=False; choose "
            "another directory or pass overwrite=True"
        )


class SourceReadingSavePlanner(DefaultSavePlanner):
    """A save planner for one process whose items are a source checkpoint's,
    each read from the source only when the storage writer resolves it.

    Pass it to ``distcp.save({}, ..., no_dist=True)``. ``reader`` must have
    read ``metadata`` (``read_metadata`` and ``set_up_storage_reader``).
    """

    def __init__(self, reader: StorageReader, metadata: Metadata) -> None:
        super().__init__(flatten_state_dict=False)
        self.source_metadata = metadata
        self._items = _SourceItems(reader, metadata)

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if state_dict:
            raise ValueError(
                "SourceReadingSavePlanner saves its source checkpoint: pass an empty state dict"
            )
        super().set_up_planner(state_dict, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        storage = self.source_metadata.storage_data
        storage = storage if isinstance(storage, dict) else {}
        for key, entry in self.source_metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                index = MetadataIndex(key)
                length = getattr(storage.get(index), "length", 0)
                nbytes = length if isinstance(length, int) else 0
                items.append(
                    WriteItem(index, WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(nbytes))
                )
                continue
            whole = len(entry.chunks) == 1 and tuple(entry.chunks[0].sizes) == tuple(entry.size)
            kind = WriteItemType.TENSOR if whole else WriteItemType.SHARD
            for chunk in entry.chunks:
                data = TensorWriteData(
                    ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes)),
                    entry.properties,
                    torch.Size(entry.size),
                )
                items.append(WriteItem(MetadataIndex(key, chunk.offsets), kind, tensor_data=data))
        return SavePlan(items, planner_data=_saved_paths(self.source_metadata))

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            value = self._items.read_value(key)
            return io.BytesIO(encode_value(value, key=key))
        assert write_item.tensor_data is not None
        return self._items.read_chunk(key, write_item.tensor_data.chunk)


def _saved_paths(metadata: Metadata) -> dict[str, list[str | int]]:
    """The source's key → nested path, for the keys it holds (a key without
    one is its own top-level path)."""
    recorded = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths: dict[str, list[str | int]] = {}
    for key in metadata.state_dict_metadata:
        path = recorded.get(key)
        paths[key] = list(path) if isinstance(path, (list, tuple)) and path else [key]
    return paths


class _SourceItems(DefaultLoadPlanner):
    """Reads one chunk or one value at a time from a source checkpoint, each
    through the reader's full protocol (so a distcp source verifies it).

    A load planner of its own: ``resolve_tensor`` hands the reader the buffer
    of the chunk being read; values are decoded by ``DefaultLoadPlanner``.
    """

    def __init__(self, reader: StorageReader, metadata: Metadata) -> None:
        super().__init__(flatten_state_dict=False)
        self.reader = reader
        self.source_metadata = metadata
        self._target: torch.Tensor | None = None
        self._lock = threading.Lock()  # one read at a time: the reader keeps per-read state

    def read_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        entry = self.source_metadata.state_dict_metadata[key]
        assert isinstance(entry, TensorStorageMetadata)
        buffer = transient_tensor(chunk.sizes, entry.properties.dtype)
        if buffer.numel() == 0:
            return buffer
        zeros = torch.Size([0] * len(chunk.sizes))
        index = MetadataIndex(key, chunk.offsets)
        item = ReadItem(LoadItemType.TENSOR, index, zeros, index, zeros, torch.Size(chunk.sizes))
        with self._lock:
            self._target = buffer
            try:
                self._read(LoadPlan([item]))
            finally:
                self._target = None
        return buffer

    def read_full(self, key: str) -> torch.Tensor:
        """The whole tensor ``key``, its chunks read into one new buffer."""
        entry = self.source_metadata.state_dict_metadata[key]
        assert isinstance(entry, TensorStorageMetadata)
        whole = transient_tensor(tuple(entry.size), entry.properties.dtype)
        items = []
        for chunk in entry.chunks:
            index = MetadataIndex(key, chunk.offsets)
            zeros = torch.Size([0] * len(chunk.sizes))
            items.append(
                ReadItem(
                    LoadItemType.TENSOR,
                    index,
                    torch.Size(chunk.offsets),
                    index,
                    zeros,
                    torch.Size(chunk.sizes),
                )
            )
        if whole.numel() == 0 or not items:
            return whole
        with self._lock:
            self._target = whole
            try:
                self._read(LoadPlan(items))
            finally:
                self._target = None
        return whole

    def read_value(self, key: str) -> Any:
        index = MetadataIndex(key)
        zero = torch.Size([0])
        item = ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero)
        with self._lock:
            self.set_up_planner({key: None}, self.source_metadata)
            self._read(LoadPlan([item]))
            value = self.state_dict[key]
            self.set_up_planner({}, self.source_metadata)
        return value

    def _read(self, plan: LoadPlan) -> None:
        reader = self.reader
        plan = reader.prepare_local_plan(plan)
        plan = self.finish_plan(reader.prepare_global_plan([plan])[0])
        wait_future(reader.read_data(plan, self))
        if isinstance(reader, FileSystemReader):
            reader.verify_split_blocks([reader.masked_checksums()])

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        assert self._target is not None, "resolve_tensor outside read_chunk"
        return self._region(read_item)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        region = self._region(read_item)
        if tensor.data_ptr() != region.data_ptr():
            region.copy_(tensor)  # a reader that resolved into its own staging tensor

    def _region(self, read_item: ReadItem) -> torch.Tensor:
        """Where ``read_item`` lands in the buffer being filled."""
        assert self._target is not None
        region = self._target
        if (region.dim() and any(read_item.dest_offsets)) or tuple(read_item.lengths) != tuple(
            region.shape
        ):
            for dim, (offset, length) in enumerate(
                zip(read_item.dest_offsets, read_item.lengths, strict=True)
            ):
                region = region.narrow(dim, offset, length)
        return region
