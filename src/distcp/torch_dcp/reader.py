"""Reading a checkpoint that torch DCP's ``FileSystemWriter`` wrote.

Its ``.metadata`` is a pickle: it is read with the restricted unpickler and
checked (:func:`read_torch_metadata`) before any data file is opened. Each item's
``_StorageInfo`` gives a byte range of a ``__<rank>_<n>.distcp`` file; torch
writes a tensor chunk there with ``torch.save`` and a non-tensor value as the
``torch.save`` bytes of the object. Only the ranges a plan needs are read, and
each goes through ``torch.load(weights_only=True)``, which builds tensors and
plain values but never runs code from the file.

Tensors are narrowed to each read item's region and copied into
``planner.resolve_tensor(item)``, then ``planner.commit_tensor`` — in place,
resharded however the planner asks. Byte values are handed to distcp's
``DefaultLoadPlanner`` in distcp's own value encoding (decoded here, re-encoded
with :func:`distcp.value_codec.encode_value`); any other planner (torch's own
``DefaultLoadPlanner`` among them) gets the raw ``torch.save`` bytes, as torch's
reader gives it.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from distcp.errors import (
    CheckpointFormatError,
    CorruptCheckpointError,
    PickleNotAllowedError,
    UnsupportedStorageError,
)
from distcp.filesystem.load_report import LoadReport
from distcp.filesystem.safe_open import open_regular_file, read_regular_file
from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from distcp.storage import done_future
from distcp.torch_dcp.files import check_files, open_checked
from distcp.torch_dcp.merged_values import MergedValue, add_merged_entries, assemble
from distcp.torch_dcp.safe_unpickle import safe_loads
from distcp.torch_dcp.structure import build_metadata
from distcp.value_codec import encode_value

__all__ = [
    "TORCH_METADATA_FILE_NAME",
    "TorchDcpCheckpoint",
    "is_torch_dcp_checkpoint",
    "read_torch_metadata",
]

TORCH_METADATA_FILE_NAME = ".metadata"
_PICKLE_PROTO = 0x80  # the first byte of every pickle of protocol 2 or later
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive


def is_torch_dcp_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` holds a torch DCP ``.metadata`` pickle. (distcp's own
    checkpoints may hold a ``.metadata`` too: a text marker, never a pickle.)"""
    metadata = Path(path) / TORCH_METADATA_FILE_NAME
    if not os.path.lexists(metadata):
        return False
    with os.fdopen(open_regular_file(metadata, "torch DCP metadata file"), "rb") as file:
        return file.read(1) == bytes([_PICKLE_PROTO])


def read_torch_metadata(path: str | Path) -> Metadata:
    """The checked :class:`Metadata` of the torch DCP checkpoint at ``path``,
    read without running anything from it, its data files not yet opened
    (they are only checked to lie inside ``path`` and to hold every range)."""
    root = Path(path)
    source = root / TORCH_METADATA_FILE_NAME
    metadata = build_metadata(
        safe_loads(read_regular_file(source, "torch DCP metadata file"), source=str(source)),
        source=str(source),
    )
    storage: dict[MetadataIndex, _StorageInfo] = metadata.storage_data
    check_files(
        root,
        (
            (info.relative_path, info.offset + info.length, f"key {index.fqn!r}")
            for index, info in storage.items()
        ),
    )
    return metadata


class TorchDcpCheckpoint:
    """A torch DCP checkpoint directory, its metadata read and checked;
    :meth:`read_data` is ``StorageReader.read_data`` for it."""

    def __init__(self, path: str | Path, *, thread_count: int = 1) -> None:
        self.path = Path(path)
        self.thread_count = max(1, thread_count)
        self.metadata = read_torch_metadata(self.path)
        #: containers torch split into parts that distcp's planner asks for whole
        self.merged: dict[str, MergedValue] = add_merged_entries(self.metadata)

    def read_data(
        self, plan: LoadPlan, planner: LoadPlanner, report: LoadReport | None = None
    ) -> torch.futures.Future[None]:
        """Read every item of ``plan`` into ``planner`` (see the module docstring)."""
        report = report if report is not None else LoadReport()
        storage: dict[MetadataIndex, _StorageInfo] = self.metadata.storage_data
        by_index: dict[MetadataIndex, list[ReadItem]] = defaultdict(list)
        merged: list[ReadItem] = []
        for item in plan.items:
            if item.storage_index.fqn in self.merged and item.type == LoadItemType.BYTE_IO:
                merged.append(item)
                continue
            if item.storage_index not in storage:
                raise CheckpointFormatError(
                    f"key {item.storage_index.fqn!r}: the plan reads item "
                    f"{item.storage_index.offset} which the torch DCP checkpoint {self.path} "
                    "does not have"
                )
            by_index[item.storage_index].append(item)
        tasks = sorted(
            by_index.items(),
            key=lambda task: (storage[task[0]].relative_path, storage[task[0]].offset),
        )
        lock = threading.Lock()
        buckets = list(_buckets(tasks, storage, self.thread_count))
        if len(buckets) <= 1:
            for bucket in buckets:
                self._read_bucket(bucket, planner, lock, report)
        else:
            with ThreadPoolExecutor(len(buckets), thread_name_prefix="distcp-torch-read") as pool:
                futures = [
                    pool.submit(self._read_bucket, bucket, planner, lock, report)
                    for bucket in buckets
                ]
                for future in futures:
                    future.result()
        for item in merged:
            self._load_merged(item, planner, report)
        return done_future(None)

    def _load_merged(self, read_item: ReadItem, planner: LoadPlanner, report: LoadReport) -> None:
        """Rebuild a container torch saved in parts (see :mod:`.merged_values`)
        and hand it to the planner as one value."""
        storage: dict[MetadataIndex, _StorageInfo] = self.metadata.storage_data
        merged = self.merged[read_item.storage_index.fqn]
        allow_pickle = isinstance(planner, DefaultLoadPlanner) and planner.allow_pickle
        parts = []
        for path, key in merged.parts:
            index = MetadataIndex(key)
            info = storage[index]
            item = _Item(index, info, self.path / info.relative_path)
            with open_checked(self.path, info.relative_path, item.end, item.what) as file:
                parts.append((path, item.load_value(item.read(file), allow_pickle=allow_pickle)))
            report.add(needed=info.length, read=info.length)
        report.add(items=1)
        current = getattr(planner, "state_dict", None)  # the caller's value shapes the rebuild
        value = assemble(parts, current.get(merged.key) if isinstance(current, dict) else None)
        if isinstance(planner, DefaultLoadPlanner):
            data = encode_value(value, key=merged.key, allow_pickle=allow_pickle)
        else:
            buffer = io.BytesIO()
            torch.save(value, buffer)
            data = buffer.getvalue()
        planner.load_bytes(read_item, io.BytesIO(data))

    def _read_bucket(
        self,
        bucket: list[tuple[MetadataIndex, list[ReadItem]]],
        planner: LoadPlanner,
        lock: threading.Lock,
        report: LoadReport,
    ) -> None:
        storage: dict[MetadataIndex, _StorageInfo] = self.metadata.storage_data
        with ExitStack() as files:
            opened: dict[str, BinaryIO] = {}
            for index, items in bucket:
                info = storage[index]
                item = _Item(index, info, self.path / info.relative_path)
                if info.relative_path not in opened:
                    opened[info.relative_path] = files.enter_context(
                        open_checked(self.path, info.relative_path, item.end, item.what)
                    )
                data = item.read(opened[info.relative_path])
                report.add(needed=info.length, read=info.length, items=len(items))
                if items[0].type == LoadItemType.BYTE_IO:
                    self._load_value(item, data, items, planner, lock)
                else:
                    self._load_chunk(item, data, items, planner, lock)

    def _load_chunk(
        self,
        item: _Item,
        data: bytes,
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
    ) -> None:
        entry = self.metadata.state_dict_metadata.get(item.index.fqn)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointFormatError(f"{item.what}: the plan reads a tensor the key is not")
        sizes = next(
            tuple(chunk.sizes) for chunk in entry.chunks if chunk.offsets == item.index.offset
        )
        chunk = item.load_tensor(data, entry.properties.dtype, sizes)
        for read_item in items:
            source = _narrowed(chunk, read_item, item.what)
            with lock:
                target = planner.resolve_tensor(read_item).detach()
            if target.shape != source.shape:
                raise CheckpointFormatError(
                    f"{item.what}: the planner's destination has shape {list(target.shape)} "
                    f"for a region of shape {list(source.shape)}"
                )
            with torch.no_grad():
                target.copy_(source)
            with lock:
                planner.commit_tensor(read_item, target)

    def _load_value(
        self,
        item: _Item,
        data: bytes,
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
    ) -> None:
        if isinstance(planner, DefaultLoadPlanner):
            value = item.load_value(data, allow_pickle=planner.allow_pickle)
            data = encode_value(value, key=item.index.fqn, allow_pickle=planner.allow_pickle)
        for read_item in items:
            with lock:
                planner.load_bytes(read_item, io.BytesIO(data))


@dataclass
class _Item:
    """One saved item being read: where it is, for reading and for messages."""

    index: MetadataIndex
    info: _StorageInfo
    file: Path

    @property
    def end(self) -> int:
        return int(self.info.offset + self.info.length)

    @property
    def what(self) -> str:
        chunk = f" chunk at {list(self.index.offset)}" if self.index.offset is not None else ""
        return f"key {self.index.fqn!r}{chunk}"

    def read(self, file: BinaryIO) -> bytes:
        descriptors = self.info.transform_descriptors
        if descriptors:
            raise UnsupportedStorageError(
                f"{self.what} in {self.file} was written through torch DCP extensions "
                f"{list(descriptors)} (e.g. zstd compression), which distcp does not decode; "
                "load it with storage_reader=torch.distributed.checkpoint.FileSystemReader(path)"
            )
        file.seek(self.info.offset)
        data = file.read(self.info.length)
        if len(data) != self.info.length:
            raise self.corrupt(f"only {len(data)} of {self.info.length} bytes could be read")
        return data

    def load_tensor(self, data: bytes, dtype: torch.dtype, sizes: tuple[int, ...]) -> torch.Tensor:
        if not data.startswith(_ZIP_MAGIC):
            saved_as = (
                " (it looks like safetensors: torch DCP's serialization_format=SAFETENSORS, "
                "which distcp does not read)"
                if data[8:9] == b"{"
                else ""
            )
            raise self.corrupt(f"the bytes are not a torch.save archive{saved_as}")
        try:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged archive: zip, pickle or storage errors
            raise self.corrupt(f"torch.load failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(tensor, torch.Tensor) or type(tensor) not in (
            torch.Tensor,
            torch.nn.Parameter,
        ):
            raise self.corrupt(f"it holds a {type(tensor).__name__}, not a tensor")
        if tensor.dtype != dtype or tuple(tensor.shape) != sizes:
            raise self.corrupt(
                f"it holds a {tensor.dtype} tensor of shape {list(tensor.shape)}, the metadata "
                f"says {dtype} of shape {list(sizes)}"
            )
        return tensor.detach()

    def load_value(self, data: bytes, *, allow_pickle: bool) -> object:
        if not data.startswith(_ZIP_MAGIC):
            raise self.corrupt("the bytes are not a torch.save archive")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as exc:
            if allow_pickle or "Weights only load failed" not in str(exc):
                raise self.corrupt(f"torch.load failed: {_first_line(exc)}") from None
            raise PickleNotAllowedError(
                f"{self.what} in {self.file}: the value holds a type torch.load(weights_only=True) "
                f"does not build, so it was refused and nothing in it was run "
                f"({_first_line(exc)}). If you trust this checkpoint, load with "
                "DefaultLoadPlanner(allow_pickle=True)"
            ) from None
        except Exception as exc:
            raise self.corrupt(f"torch.load failed: {type(exc).__name__}: {exc}") from None

    def corrupt(self, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.what}: bytes {self.info.offset}..{self.end} of {self.file}: {why}",
            file=str(self.file),
            offset=self.info.offset,
        )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "Unsupported" in line]
    return lines[0] if lines else str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _narrowed(chunk: torch.Tensor, item: ReadItem, what: str) -> torch.Tensor:
    offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
    if (
        len(offsets) != chunk.ndim
        or len(lengths) != chunk.ndim
        or any(
            o < 0 or n < 0 or o + n > size
            for o, n, size in zip(offsets, lengths, chunk.shape, strict=True)
        )
    ):
        raise CheckpointFormatError(
            f"{what}: the plan reads region {list(offsets)}+{list(lengths)}, outside the saved "
            f"chunk of shape {list(chunk.shape)}"
        )
    for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        if offset or length != chunk.shape[dim]:
            chunk = chunk.narrow(dim, offset, length)
    return chunk


def _buckets(
    tasks: list[tuple[MetadataIndex, list[ReadItem]]],
    storage: dict[MetadataIndex, _StorageInfo],
    threads: int,
) -> Iterator[list[tuple[MetadataIndex, list[ReadItem]]]]:
    """``tasks`` (in file order) cut into at most ``threads`` runs of about
    equal bytes, one per reader thread."""
    if not tasks:
        return
    share = sum(storage[index].length for index, _ in tasks) / min(threads, len(tasks))
    bucket: list[tuple[MetadataIndex, list[ReadItem]]] = []
    filled = 0
    for task in tasks:
        bucket.append(task)
        filled += storage[task[0]].length
        if filled >= share and threads > 1:
            yield bucket
            bucket, filled, threads = [], 0, threads - 1
    if bucket:
        yield bucket
