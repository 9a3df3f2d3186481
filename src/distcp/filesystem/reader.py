"""``FileSystemReader``: reads and validates a checkpoint's metadata, then reads
only the byte ranges a load plan needs, verifying checksums as it goes."""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distcp import knobs
from distcp.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.filesystem.tensor_bytes import checksum_mismatch, require_little_endian, writable_bytes
from distcp.geometry import Box
from distcp.metadata import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata
from distcp.metadata_file import decode_metadata
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from distcp.storage import StorageReader

__all__ = ["FileSystemReader", "LoadReport"]

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What one rank's last ``read_data`` did: bytes the plan needed, bytes read
    from storage (more when checksum blocks are read whole to verify them), and
    bytes whose checksums were verified."""

    bytes_needed: int = 0
    bytes_read: int = 0
    bytes_verified: int = 0
    items: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, needed: int = 0, read: int = 0, verified: int = 0, items: int = 0) -> None:
        with self._lock:
            self.bytes_needed += needed
            self.bytes_read += read
            self.bytes_verified += verified
            self.items += items

    @property
    def read_amplification(self) -> float:
        """Bytes read ÷ bytes needed (1.0 is ideal)."""
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0


class FileSystemReader(StorageReader):
    """Reads a checkpoint from a directory.

    Args:
        path: the checkpoint directory.
        thread_count: reader threads per rank.
        verify_checksums: verify the crc32c of every block read (default). A block
            only partly needed is read whole so it can be verified.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        thread_count: int = knobs.DEFAULT_THREAD_COUNT,
        verify_checksums: bool = True,
        **_ignored: Any,
    ) -> None:
        require_little_endian()
        self.path = Path(path)
        self.thread_count = max(1, thread_count)
        self.verify_checksums = verify_checksums
        self.metadata: Metadata | None = None
        self.report = LoadReport()
        self._file_sizes: dict[str, int] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.metadata = None
        self.report = LoadReport()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return Path(checkpoint_id).is_dir()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if not self.path.exists():
            raise CheckpointNotFoundError(f"no checkpoint at {self.path}: the path does not exist")
        metadata_path = self.path / METADATA_FILE_NAME
        if not metadata_path.is_file():
            if not self.path.is_dir():
                raise CheckpointNotFoundError(f"{self.path} is not a checkpoint directory")
            hint = ""
            if (self.path / ".metadata").is_file():
                hint = " It holds a torch DCP '.metadata' file: load it with torch DCP."
            raise IncompleteCheckpointError(
                f"{self.path} holds no committed checkpoint ({METADATA_FILE_NAME} is missing): "
                f"a save into it did not finish, so its data files are not loadable.{hint}"
            )
        metadata, self._file_sizes = decode_metadata(
            metadata_path.read_bytes(), source=str(metadata_path)
        )
        self.metadata = metadata
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.metadata is None:
            raise CheckpointFormatError("read_data called before read_metadata")
        self.report = LoadReport()
        storage: dict[MetadataIndex, StorageInfo] = self.metadata.storage_data
        by_item: dict[MetadataIndex, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            if item.storage_index not in storage:
                raise CheckpointFormatError(
                    f"key {item.storage_index.fqn!r}: the plan reads item "
                    f"{item.storage_index.offset} which the checkpoint does not have"
                )
            by_item[item.storage_index].append(item)
        self._check_files({storage[index].relative_path for index in by_item})

        planner_lock = threading.Lock()
        tasks = sorted(by_item.items(), key=lambda kv: -storage[kv[0]].length)
        with ThreadPoolExecutor(self.thread_count, thread_name_prefix="distcp-read") as pool:
            futures = [
                pool.submit(self._read_item, index, storage[index], items, planner, planner_lock)
                for index, items in tasks
            ]
            for done in futures:
                done.result()
        log.debug(
            "distcp load: %d items, %d bytes needed, %d read (×%.3f), %d verified",
            self.report.items,
            self.report.bytes_needed,
            self.report.bytes_read,
            self.report.read_amplification,
            self.report.bytes_verified,
        )
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _check_files(self, names: set[str]) -> None:
        """Before reading anything: every file this rank reads exists and has
        the size the metadata recorded (catches truncation and replacement)."""
        for name in sorted(names):
            path = self.path / name
            expected = self._file_sizes.get(name)
            try:
                status = path.stat()
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"data file {path} is missing", file=str(path), offset=0
                ) from None
            if not stat.S_ISREG(status.st_mode):
                raise CorruptCheckpointError(
                    f"data file {path} is not a regular file (replaced by a directory?)",
                    file=str(path),
                    offset=0,
                )
            actual = status.st_size
            if expected is not None and actual != expected:
                raise CorruptCheckpointError(
                    f"data file {path} is {actual} bytes but the metadata records {expected} "
                    f"(truncated or replaced; first difference at offset {min(actual, expected)})",
                    file=str(path),
                    offset=min(actual, expected),
                )

    def _read_item(
        self,
        index: MetadataIndex,
        info: StorageInfo,
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
    ) -> None:
        path = self.path / info.relative_path
        fd = os.open(path, os.O_RDONLY)
        try:
            if items[0].type == LoadItemType.BYTE_IO:
                data = bytearray(info.length)
                self._read_verified(fd, path, index, info, memoryview(data), 0)
                self.report.add(needed=info.length, items=len(items))
                for item in items:
                    with lock:
                        planner.load_bytes(item, io.BytesIO(bytes(data)))
                return
            assert self.metadata is not None
            entry = self.metadata.state_dict_metadata[index.fqn]
            assert isinstance(entry, TensorStorageMetadata) and index.offset is not None
            chunk = next(c for c in entry.chunks if tuple(c.offsets) == index.offset)
            _ChunkReader(
                self, fd, path, index, info, entry.properties.dtype, tuple(chunk.sizes)
            ).read(items, planner, lock)
        finally:
            os.close(fd)

    def _read_verified(
        self,
        fd: int,
        path: Path,
        index: MetadataIndex,
        info: StorageInfo,
        buffer: memoryview,
        start: int,
    ) -> None:
        """Read ``len(buffer)`` bytes at ``start`` inside the item into ``buffer``
        and verify them; ``start`` and the end must lie on checksum blocks
        (or the item's end) when checksums are verified."""
        _pread_exactly(fd, buffer, info.offset + start, path)
        self.report.add(read=len(buffer))
        if not self.verify_checksums or not len(buffer):
            return
        block = info.checksum_block_size
        bad = checksum_mismatch(buffer, start // block, info.checksums, block)
        if bad is not None:
            offset = info.offset + bad * block
            raise CorruptCheckpointError(
                f"checksum mismatch in {path} at byte offset {offset} (key {index.fqn!r}"
                + (f", chunk at {list(index.offset)}" if index.offset is not None else "")
                + "): the data file is corrupt",
                file=str(path),
                offset=offset,
            )
        self.report.add(verified=len(buffer))


class _ChunkReader:
    """Reads the parts of one saved chunk that a rank's read items need."""

    def __init__(
        self,
        reader: FileSystemReader,
        fd: int,
        path: Path,
        index: MetadataIndex,
        info: StorageInfo,
        dtype: torch.dtype,
        sizes: tuple[int, ...],
    ) -> None:
        self.reader, self.fd, self.path, self.index, self.info = reader, fd, path, index, info
        self.dtype = dtype
        self.sizes = sizes

    def read(self, items: list[ReadItem], planner: LoadPlanner, lock: threading.Lock) -> None:
        whole = Box((0,) * len(self.sizes), self.sizes)
        pending: list[tuple[ReadItem, torch.Tensor]] = []
        for item in items:
            region = Box(tuple(item.storage_offsets), tuple(item.lengths))
            with lock:
                dest = planner.resolve_tensor(item)
            self.reader.report.add(needed=region.numel * self.dtype.itemsize, items=1)
            if region == whole and self._direct(dest):
                self.reader._read_verified(
                    self.fd, self.path, self.index, self.info, writable_bytes(dest), 0
                )
                with lock:
                    planner.commit_tensor(item, dest)
            else:
                pending.append((item, dest))
        if pending:
            self._read_windows(pending)
            for item, dest in pending:
                with lock:
                    planner.commit_tensor(item, dest)

    def _direct(self, dest: torch.Tensor) -> bool:
        return (
            dest.dtype == self.dtype
            and dest.device.type == "cpu"
            and dest.is_contiguous()
            and dest.numel() * dest.element_size() == self.info.length
        )

    def _read_windows(self, pending: list[tuple[ReadItem, torch.Tensor]]) -> None:
        """Read the rows of the chunk that items need, a bounded window at a
        time (whole checksum blocks when verifying), and copy each item's part
        out of the window, casting to the destination's dtype."""
        itemsize = self.dtype.itemsize
        rows, row_shape = (self.sizes[0], self.sizes[1:]) if self.sizes else (1, ())
        row_bytes = itemsize
        for size in row_shape:
            row_bytes *= size
        if row_bytes == 0 or rows == 0:
            return
        rows_per_window = max(1, knobs.READ_WINDOW_SIZE // row_bytes)
        needed = sorted(
            (item.storage_offsets[0], item.storage_offsets[0] + item.lengths[0])
            if self.sizes
            else (0, 1)
            for item, _ in pending
        )
        block = self.info.checksum_block_size
        for first, last in needed_windows(needed, rows_per_window):
            start, end = first * row_bytes, last * row_bytes
            if self.reader.verify_checksums:
                start = start // block * block
                end = min(-(-end // block) * block, self.info.length)
            buffer = torch.empty(end - start, dtype=torch.uint8)
            self.reader._read_verified(
                self.fd, self.path, self.index, self.info, writable_bytes(buffer), start
            )
            skip = first * row_bytes - start
            window = buffer[skip : skip + (last - first) * row_bytes].view(self.dtype)
            window = window.reshape((last - first, *row_shape)) if self.sizes else window[0]
            for item, dest in pending:
                _copy_overlap(item, dest, window, first, last, bool(self.sizes))


def needed_windows(ranges: list[tuple[int, int]], rows_per_window: int) -> list[tuple[int, int]]:
    """Row windows ``[first, last)`` covering the union of the (sorted) needed
    row ranges, each at most ``rows_per_window`` rows."""
    merged: list[list[int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    windows = []
    for first, last in merged:
        for start in range(first, last, rows_per_window):
            windows.append((start, min(start + rows_per_window, last)))
    return windows


def _copy_overlap(
    item: ReadItem, dest: torch.Tensor, window: torch.Tensor, first: int, last: int, has_rows: bool
) -> None:
    """Copy the part of ``item``'s region that lies in rows ``[first, last)``."""
    if not has_rows:
        dest.copy_(window)
        return
    row0 = item.storage_offsets[0]
    lo, hi = max(first, row0), min(last, row0 + item.lengths[0])
    if lo >= hi:
        return
    source_index = [slice(lo - first, hi - first)]
    source_index += [
        slice(offset, offset + length)
        for offset, length in zip(item.storage_offsets[1:], item.lengths[1:], strict=True)
    ]
    dest[lo - row0 : hi - row0].copy_(window[tuple(source_index)])


def _pread_exactly(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buffer):
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            raise CorruptCheckpointError(
                f"data file {path} ends at byte {offset + done}, before the "
                f"{len(buffer)} bytes the metadata records at offset {offset}",
                file=str(path),
                offset=offset + done,
            )
        done += count
