"""Reading the parts of one saved chunk that a rank needs, verifying checksums.

The chunk's bytes are mapped read-only from its data file, and each requested
region is copied from the mapping straight into its destination tensor (with a
cast when the dtypes differ): a whole chunk is one contiguous copy, a column
slice of a row-major chunk one strided copy, so only the needed bytes are
touched and no staging buffer is allocated. Work proceeds in windows of whole
checksum blocks; the window's pages are released afterwards, so resident
memory stays bounded however large the chunk.

Checksums (``crc32c`` per block of ``B`` bytes, counted from the chunk's start):

- a block lying inside one contiguous region this rank reads is verified here,
  before the window's data is copied out;
- a block split between ranks in a *cooperative* chunk (see
  :mod:`distcp.filesystem.block_verification`) gets this rank's masked crc —
  the block with every byte outside the rank's regions zeroed — which the ranks
  combine after reading;
- any other partly needed block is read whole and verified here (the extra
  bytes are counted as read).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import torch

from distcp import knobs
from distcp.errors import CorruptCheckpointError
from distcp.filesystem.block_verification import BlockKey, block_length
from distcp.filesystem.load_report import LoadReport
from distcp.filesystem.tensor_bytes import writable_bytes
from distcp.geometry import Box, byte_runs, is_contiguous, strides_for
from distcp.metadata import MetadataIndex, StorageInfo

__all__ = ["ChunkReader", "ReadTarget"]

_PAGE = mmap.ALLOCATIONGRANULARITY


@dataclass
class ReadTarget:
    """One region of the chunk (relative to its origin) and where it goes."""

    region: Box
    dest: torch.Tensor
    contributes: bool = False  # masked crcs of its split blocks are this rank's to send


class ChunkReader:
    """Reads regions of the chunk stored at ``info`` in the file at ``path``."""

    def __init__(
        self,
        path: Path,
        index: MetadataIndex,
        info: StorageInfo,
        dtype: torch.dtype,
        sizes: tuple[int, ...],
        *,
        verify: bool,
        cooperative: bool,
    ) -> None:
        self.path, self.index, self.info = path, index, info
        self.dtype, self.sizes = dtype, sizes
        self.verify, self.cooperative = verify, cooperative
        self.itemsize = dtype.itemsize
        self.row_bytes = self.itemsize
        for size in sizes[1:]:
            self.row_bytes *= size
        self.block = info.checksum_block_size

    def read(self, targets: list[ReadTarget], report: LoadReport) -> dict[BlockKey, int]:
        """Fill every target's destination; return this rank's masked crcs of
        split blocks (empty unless the chunk is cooperative)."""
        targets = [t for t in targets if not t.region.is_empty]
        distinct = {t.region for t in targets}
        report.add(
            needed=sum(t.region.numel for t in targets) * self.itemsize,
            read=sum(region.numel for region in distinct) * self.itemsize,
        )
        if not targets or self.row_bytes == 0:
            return {}
        blocks = _BlockPlan(self, targets) if self.verify else None
        masked: dict[BlockKey, int] = {}
        with _map_chunk(self.path, self.info) as mapped:
            source = _aligned(mapped.data, self.itemsize)
            typed = source.view(self.dtype).reshape(self.sizes)
            checked = writable_bytes(source)
            for start, end in self._windows(targets):
                mapped.prefetch(end, end + (end - start))
                if blocks is not None:
                    blocks.verify_window(checked, start, end, report)
                    masked.update(blocks.mask_window(typed, start, end))
                self._copy_rows(targets, typed, start, end)
                mapped.release(end)
        if self.verify and not masked:
            report.add(verified=sum(region.numel for region in distinct) * self.itemsize)
        elif masked:
            report.add(pending_verified=sum(region.numel for region in distinct) * self.itemsize)
        return masked

    def _windows(self, targets: list[ReadTarget]) -> Iterator[tuple[int, int]]:
        """Block-aligned byte windows of the chunk, in order, covering every
        block a region touches, each at most ``READ_WINDOW_SIZE``."""
        length = self.info.length
        if not self.sizes:  # a 0-d chunk: one element, one window
            yield 0, length
            return
        per_window = max(1, knobs.READ_WINDOW_SIZE // self.block)
        touched: set[int] = set()
        for target in targets:
            touched.update(self.touched_blocks(target.region))
        run: list[int] = []
        for number in sorted(touched):
            if run and (number != run[-1] + 1 or len(run) == per_window):
                yield run[0] * self.block, min((run[-1] + 1) * self.block, length)
                run = []
            run.append(number)
        if run:
            yield run[0] * self.block, min((run[-1] + 1) * self.block, length)

    def touched_blocks(self, region: Box) -> set[int]:
        """Numbers of the checksum blocks holding at least one byte of the
        region's rows (each row taken from its first to its last needed byte)."""
        first, last = self.extent(region)
        block = self.block
        if not self.sizes or self.row_bytes <= block or region.sizes[0] == 1:
            # Every block between the first and last byte holds part of a row.
            return set(range(first // block, -(-last // block)))
        row_span = last - first - (region.sizes[0] - 1) * self.row_bytes
        touched: set[int] = set()
        for row in range(region.sizes[0]):  # rows longer than a block: few of them
            start = first + row * self.row_bytes
            touched.update(range(start // block, -(-(start + row_span) // block)))
        return touched

    def extent(self, region: Box) -> tuple[int, int]:
        """``[first, last)``: the bytes from the region's first element to the
        end of its last, inside the chunk."""
        strides = strides_for(self.sizes)
        first = sum(o * s for o, s in zip(region.offsets, strides, strict=True))
        last = sum((e - 1) * s for e, s in zip(region.ends, strides, strict=True))
        return first * self.itemsize, (last + 1) * self.itemsize

    def _copy_rows(
        self, targets: list[ReadTarget], typed: torch.Tensor, start: int, end: int
    ) -> None:
        """Copy each region's rows whose first needed byte lies in ``[start, end)``
        (every such byte lies in some window, so each row is copied once)."""
        if not self.sizes:
            for target in targets:
                target.dest.copy_(typed)
            return
        for target in targets:
            region = target.region
            inner = self.extent(region)[0] - region.offsets[0] * self.row_bytes
            low = -(-(start - inner) // self.row_bytes)
            high = -(-(end - inner) // self.row_bytes)
            first, last = max(low, region.offsets[0]), min(high, region.ends[0])
            if first < last:
                rows = slice(first - region.offsets[0], last - region.offsets[0])
                target.dest[rows].copy_(typed[(slice(first, last), *_trailing(region))])


class _BlockPlan:
    """Which checksum blocks of the chunk this rank verifies, and how."""

    def __init__(self, reader: ChunkReader, targets: list[ReadTarget]) -> None:
        self.reader = reader
        self.targets = targets
        block = reader.block
        self.local: set[int] = set()  # inside one contiguous region: verify here
        touched: set[int] = set()
        contributed: set[int] = set()
        for target in targets:
            first, last = reader.extent(target.region)
            numbers = reader.touched_blocks(target.region)
            touched.update(numbers)
            if target.contributes:
                contributed.update(numbers)
            if is_contiguous(reader.sizes, target.region):
                self.local.update(
                    n
                    for n in numbers
                    if first <= n * block and n * block + block_length(reader.info, n) <= last
                )
        split = touched - self.local
        self.masked = (split & contributed) if reader.cooperative else set()
        self.whole = set() if reader.cooperative else split  # read whole, verify here
        self._runs: list[tuple[int, int]] | None = None

    def verify_window(self, checked: memoryview, start: int, end: int, report: LoadReport) -> None:
        reader = self.reader
        for number in self._in_window(self.local | self.whole, start, end):
            begin = number * reader.block
            length = block_length(reader.info, number)
            if crc32c.crc32c(checked[begin : begin + length]) != reader.info.checksums[number]:
                raise _corrupt(reader, number, "")
            if number in self.whole:
                report.add(read=length - self._needed_in_block(begin, length))

    def mask_window(self, typed: torch.Tensor, start: int, end: int) -> dict[BlockKey, int]:
        """This rank's masked crc of each split block in ``[start, end)``."""
        numbers = self._in_window(self.masked, start, end)
        if not numbers:
            return {}
        reader = self.reader
        first_row, end_row = start // reader.row_bytes, -(-end // reader.row_bytes)
        scratch = torch.zeros((end_row - first_row, *reader.sizes[1:]), dtype=reader.dtype)
        for target in self.targets:
            region = target.region
            low, high = max(first_row, region.offsets[0]), min(end_row, region.ends[0])
            if target.contributes and low < high:
                trailing = _trailing(region)
                scratch[(slice(low - first_row, high - first_row), *trailing)] = typed[
                    (slice(low, high), *trailing)
                ]
        data = writable_bytes(scratch)
        skip = first_row * reader.row_bytes
        masked = {}
        for number in numbers:
            begin = number * reader.block - skip
            length = block_length(reader.info, number)
            masked[(reader.index, number)] = int(crc32c.crc32c(data[begin : begin + length]))
        return masked

    def _in_window(self, numbers: set[int], start: int, end: int) -> list[int]:
        block = self.reader.block
        return [n for n in range(start // block, -(-end // block)) if n in numbers]

    def _needed_in_block(self, begin: int, length: int) -> int:
        """Bytes of this rank's distinct regions inside ``[begin, begin + length)``."""
        if self._runs is None:
            reader = self.reader
            self._runs = [
                run
                for region in {t.region for t in self.targets}
                for run in byte_runs(reader.sizes, region, reader.itemsize)
            ]
        return sum(
            max(0, min(offset + run, begin + length) - max(offset, begin))
            for offset, run in self._runs
        )


def _corrupt(reader: ChunkReader, number: int, detail: str) -> CorruptCheckpointError:
    offset = reader.info.offset + number * reader.block
    return CorruptCheckpointError(
        f"checksum mismatch in {reader.path} at byte offset {offset} (key "
        f"{reader.index.fqn!r}, chunk at {list(reader.index.offset or ())}){detail}: "
        "the data file is corrupt",
        file=str(reader.path),
        offset=offset,
    )


def _trailing(region: Box) -> tuple[slice, ...]:
    return tuple(
        slice(offset, offset + size)
        for offset, size in zip(region.offsets[1:], region.sizes[1:], strict=True)
    )


def _aligned(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """The chunk's bytes at an address a dtype view accepts (the format does
    not promise aligned offsets; distcp's writer aligns to 64 bytes)."""
    if data.data_ptr() % itemsize:
        return data.clone()
    return data


class _MappedChunk:
    """A chunk's bytes mapped read-only (copy-on-write, never written)."""

    def __init__(self, path: Path, info: StorageInfo) -> None:
        self.base = info.offset // _PAGE * _PAGE
        self.skip = info.offset - self.base
        with open(path, "rb") as file:
            self.mapping = mmap.mmap(
                file.fileno(), self.skip + info.length, access=mmap.ACCESS_COPY, offset=self.base
            )
        self.data = torch.frombuffer(
            self.mapping, dtype=torch.uint8, count=info.length, offset=self.skip
        )
        self.released = 0

    def prefetch(self, start: int, end: int) -> None:
        """Ask the kernel to start reading chunk bytes ``[start, end)``."""
        begin = (self.skip + start) // _PAGE * _PAGE
        stop = min(self.skip + end, len(self.mapping))
        if begin < stop:
            self.mapping.madvise(mmap.MADV_WILLNEED, begin, stop - begin)

    def release(self, end: int) -> None:
        """Drop the mapped pages before chunk byte ``end`` from this process
        (they stay in the page cache)."""
        stop = (self.skip + end) // _PAGE * _PAGE
        if stop > self.released:
            self.mapping.madvise(mmap.MADV_DONTNEED, self.released, stop - self.released)
            self.released = stop

    def close(self) -> None:
        del self.data
        with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
            self.mapping.close()


@contextlib.contextmanager
def _map_chunk(path: Path, info: StorageInfo) -> Iterator[_MappedChunk]:
    mapped = _MappedChunk(path, info)
    try:
        yield mapped
    finally:
        mapped.close()


def read_exactly(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """``pread`` exactly ``len(buffer)`` bytes at ``offset`` or raise naming the file."""
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
