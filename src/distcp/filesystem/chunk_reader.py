"""Reading the parts of one saved chunk that a rank needs, verifying checksums.

Two ways, each touching only the needed bytes:

- **Direct**: a region that is one contiguous run of the chunk, covers whole
  checksum blocks and lands in a contiguous tensor of the saved dtype (a chunk
  loaded as it was saved, a row range of one) is ``pread`` straight into its
  destination in pieces of ``knobs.DIRECT_READ_SIZE``, each block's crc
  extended over each piece while it is still in cache. One copy, from the page
  cache into place. When a block fails, the error is raised with the
  destination partly filled.
- **Mapped**: any other region is copied out of the data file's read-only
  mapping (:mod:`distcp.filesystem.file_mappings`) into its destination, with a
  cast when the dtypes differ: a column slice of a row-major chunk is one
  strided copy. Work proceeds in windows of whole checksum blocks, each verified
  before it is copied out (a small chunk read whole takes a short path); the
  window's pages are released afterwards, so resident memory stays bounded
  however large the chunk.

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

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import crc32c
import torch

from distcp import knobs
from distcp.filesystem.block_verification import BlockKey, block_length, checksum_error
from distcp.filesystem.load_report import LoadReport
from distcp.filesystem.tensor_bytes import checksum_mismatch, writable_bytes
from distcp.geometry import Box, byte_runs, is_contiguous, strides_for
from distcp.metadata import MetadataIndex, StorageInfo
from distcp.stores.base import DataSource

__all__ = ["ChunkReader", "ReadTarget"]


@dataclass
class ReadTarget:
    """One region of the chunk (relative to its origin) and where it goes."""

    region: Box
    dest: torch.Tensor
    contributes: bool = False  # masked crcs of its split blocks are this rank's to send


@dataclass(frozen=True)
class _Placed:
    """A target with its geometry inside the chunk worked out once."""

    target: ReadTarget
    first: int  # byte offset of the region's first element in the chunk
    last: int  # byte offset just past its last element
    inner: int  # byte offset of its first element inside a row
    rows: tuple[int, int]  # [first row, end row)
    trailing: tuple[slice, ...]  # the region's extent in the dims after the first
    contiguous: bool
    blocks: set[int]  # the checksum blocks holding some of the region's rows


class ChunkReader:
    """Reads regions of the chunk stored at ``info`` in the mapped file."""

    def __init__(
        self,
        mapped: DataSource,
        index: MetadataIndex,
        info: StorageInfo,
        dtype: torch.dtype,
        sizes: tuple[int, ...],
        *,
        verify: bool,
        cooperative: bool,
    ) -> None:
        self.mapped, self.index, self.info = mapped, index, info
        self.path = mapped.path
        self.dtype, self.sizes = dtype, sizes
        self.verify, self.cooperative = verify, cooperative
        self.itemsize = dtype.itemsize
        self.row_bytes = self.itemsize * math.prod(sizes[1:])
        self.block = info.checksum_block_size
        self.strides = strides_for(sizes)

    def read(self, targets: list[ReadTarget], report: LoadReport) -> dict[BlockKey, int]:
        """Fill every target's destination; return this rank's masked crcs of
        split blocks (empty unless the chunk is cooperative)."""
        live = [t for t in targets if not t.region.is_empty]
        distinct = {t.region for t in live}
        distinct_bytes = sum(region.numel for region in distinct) * self.itemsize
        report.add(
            needed=sum(t.region.numel for t in live) * self.itemsize,
            read=distinct_bytes,
        )
        if not live or self.row_bytes == 0:
            return {}
        if len(distinct) == len(live) and all(self._lands_directly(t) for t in live):
            for target in live:
                self._read_direct(target)
            report.add(verified=distinct_bytes if self.verify else 0)
            return {}
        if self._whole_and_small(live):
            self._read_whole(live[0].dest, report)
            return {}
        placed = [self._place(t) for t in live]
        blocks = _BlockPlan(self, placed) if self.verify else None
        masked: dict[BlockKey, int] = {}
        offset, length = self.info.offset, self.info.length
        source = _aligned(self.mapped.bytes[offset : offset + length], self.itemsize)
        typed = source.view(self.dtype).reshape(self.sizes)
        checked = writable_bytes(source)
        released = 0
        for start, end in self._windows(placed):
            if end - start < length:  # the chunk spans several windows
                self.mapped.prefetch(offset + end, offset + end + (end - start))
            staged: _Staged | None = None
            if blocks is not None:
                blocks.verify_window(checked, start, end, report)
                staged = blocks.mask_window(typed, start, end)
                if staged is not None:
                    masked.update(staged.masked)
            self._copy_rows(placed, typed, start, end, staged)
            self.mapped.release(offset + released, offset + end)
            released = end
        if self.verify and not masked:
            report.add(verified=distinct_bytes)
        elif masked:
            report.add(pending_verified=distinct_bytes)
        return masked

    def needed_spans(self, targets: list[ReadTarget]) -> list[tuple[int, int]]:
        """The ``[start, end)`` byte ranges of the chunk that :meth:`read` of
        ``targets`` touches: what a store that is not mapped must fetch first.
        The regions' own bytes, plus, when verifying, the whole checksum
        blocks read only to verify them (as :meth:`read` counts them)."""
        live = [t for t in targets if not t.region.is_empty]
        if not live or self.row_bytes == 0:
            return []
        if len({t.region for t in live}) == len(live) and all(
            self._lands_directly(t) for t in live
        ):
            return [self._byte_span(t.region) for t in live]
        if self._whole_and_small(live) or not self.sizes:
            return [(0, self.info.length)]
        spans = [
            (offset, offset + length)
            for region in {t.region for t in live}
            for offset, length in byte_runs(self.sizes, region, self.itemsize)
        ]
        if self.verify:
            blocks = _BlockPlan(self, [self._place(t) for t in live])
            for number in blocks.whole:
                start = number * self.block
                spans.append((start, start + block_length(self.info, number)))
        return spans

    def _byte_span(self, region: Box) -> tuple[int, int]:
        """Offsets in the chunk of the region's first byte and just past its last."""
        if region.sizes == self.sizes and not any(region.offsets):
            return 0, self.info.length  # the whole chunk
        first = sum(o * s for o, s in zip(region.offsets, self.strides, strict=True))
        last = sum((e - 1) * s for e, s in zip(region.ends, self.strides, strict=True))
        return first * self.itemsize, (last + 1) * self.itemsize

    def _lands_directly(self, target: ReadTarget) -> bool:
        """Whether the target can be ``pread`` straight into its destination:
        see the module's docstring."""
        dest, region = target.dest, target.region
        if not (
            self.sizes
            and dest.device.type == "cpu"
            and dest.dtype == self.dtype
            and dest.is_contiguous()
            and not dest.is_conj()
            and not dest.is_neg()
            and dest.numel() == region.numel
        ):
            return False
        first, last = self._byte_span(region)
        if (first, last) == (0, self.info.length):
            return True  # the whole chunk: one run of whole blocks
        if not is_contiguous(self.sizes, region):
            return False
        if not self.verify:
            return True
        return first % self.block == 0 and (last % self.block == 0 or last == self.info.length)

    def _read_direct(self, target: ReadTarget) -> None:
        """Read the target's run of the chunk into its destination a piece at a
        time, extending each block's crc over the piece while it is in cache."""
        first, last = self._byte_span(target.region)
        into = writable_bytes(target.dest)
        base = self.info.offset + first
        length = last - first
        piece, ahead = knobs.DIRECT_READ_SIZE, knobs.READ_WINDOW_SIZE
        block, crc = self.block, 0
        for start in range(0, length, piece):
            end = min(start + piece, length)
            if start % ahead == 0 and start + ahead < length:  # keep the disk busy when cold
                self.mapped.prefetch(base + start + ahead, base + min(start + 2 * ahead, length))
            self.mapped.read_into(into[start:end], base + start)
            if not self.verify:
                continue
            at = start
            while at < end:  # the piece may end blocks, or lie inside one
                stop = min(end, (first + at) // block * block + block - first)
                crc = crc32c.crc32c(into[at:stop], crc)
                if stop == end and stop < length and (first + stop) % block:
                    break  # the block goes on in the next piece
                number = (first + at) // block
                if crc != self.info.checksums[number]:
                    raise checksum_error(str(self.path), self.index, self.info, number)
                crc, at = 0, stop

    def _whole_and_small(self, targets: list[ReadTarget]) -> bool:
        """One target, the whole chunk, within one window: the common case of
        a small tensor loaded as it was saved."""
        return (
            len(targets) == 1
            and targets[0].region.sizes == self.sizes
            and self.info.length <= knobs.READ_WINDOW_SIZE
        )

    def _read_whole(self, dest: torch.Tensor, report: LoadReport) -> None:
        offset, length = self.info.offset, self.info.length
        source = _aligned(self.mapped.bytes[offset : offset + length], self.itemsize)
        if self.verify:
            bad = checksum_mismatch(writable_bytes(source), 0, self.info.checksums, self.block)
            if bad is not None:
                raise checksum_error(str(self.path), self.index, self.info, bad)
        dest.copy_(source.view(self.dtype).reshape(self.sizes))
        report.add(verified=length if self.verify else 0)

    def _place(self, target: ReadTarget) -> _Placed:
        region = target.region
        first, last = self._byte_span(region)
        rows = (region.offsets[0], region.ends[0]) if self.sizes else (0, 1)
        return _Placed(
            target,
            first,
            last,
            inner=first - rows[0] * self.row_bytes,
            rows=rows,
            trailing=tuple(
                slice(o, o + n) for o, n in zip(region.offsets[1:], region.sizes[1:], strict=True)
            ),
            contiguous=is_contiguous(self.sizes, region),
            blocks=self._touched_blocks(first, last, rows[1] - rows[0]),
        )

    def _windows(self, placed: list[_Placed]) -> Iterator[tuple[int, int]]:
        """Block-aligned byte windows of the chunk, in order, covering every
        block a region touches, each at most ``READ_WINDOW_SIZE``."""
        length = self.info.length
        if not self.sizes:  # a 0-d chunk: one element, one window
            yield 0, length
            return
        per_window = max(1, knobs.READ_WINDOW_SIZE // self.block)
        touched: set[int] = set()
        for p in placed:
            touched.update(p.blocks)
        run: list[int] = []
        for number in sorted(touched):
            if run and (number != run[-1] + 1 or len(run) == per_window):
                yield run[0] * self.block, min((run[-1] + 1) * self.block, length)
                run = []
            run.append(number)
        if run:
            yield run[0] * self.block, min((run[-1] + 1) * self.block, length)

    def _touched_blocks(self, first: int, last: int, count: int) -> set[int]:
        """Numbers of the checksum blocks holding at least one byte of a
        region's ``count`` rows spanning bytes ``[first, last)`` (each row
        taken from its first to its last needed byte)."""
        block = self.block
        if not self.sizes or self.row_bytes <= block or count == 1:
            # Every block between the first and last byte holds part of a row.
            return set(range(first // block, -(-last // block)))
        row_span = last - first - (count - 1) * self.row_bytes
        touched: set[int] = set()
        for row in range(count):  # rows longer than a block: few of them
            start = first + row * self.row_bytes
            touched.update(range(start // block, -(-(start + row_span) // block)))
        return touched

    def _copy_rows(
        self,
        placed: list[_Placed],
        typed: torch.Tensor,
        start: int,
        end: int,
        staged: _Staged | None,
    ) -> None:
        """Copy each region's rows whose first needed byte lies in ``[start, end)``
        (every such byte lies in some window, so each row is copied once), from
        the masking buffer while it is in cache, else from the mapping."""
        if not self.sizes:
            for p in placed:
                p.target.dest.copy_(typed)
            return
        for p in placed:
            row0, row1 = p.rows
            low = max(row0, -(-(start - p.inner) // self.row_bytes))
            high = min(row1, -(-(end - p.inner) // self.row_bytes))
            if low >= high:
                continue
            if staged is not None and p.target.contributes:
                source = staged.rows[(slice(low - staged.first_row, high - staged.first_row),)]
            else:
                source = typed[low:high]
            p.target.dest[low - row0 : high - row0].copy_(source[(slice(None), *p.trailing)])


@dataclass(frozen=True)
class _Staged:
    """A window's rows as masked for the checksum: this rank's contributing
    regions' bytes, zeros elsewhere."""

    rows: torch.Tensor
    first_row: int
    masked: dict[BlockKey, int]


class _BlockPlan:
    """Which checksum blocks of the chunk this rank verifies, and how."""

    def __init__(self, reader: ChunkReader, placed: list[_Placed]) -> None:
        self.reader = reader
        self.placed = placed
        block = reader.block
        local: set[int] = set()  # inside one contiguous region: verify here
        touched: set[int] = set()
        contributed: set[int] = set()
        for p in placed:
            numbers = p.blocks
            touched.update(numbers)
            if p.target.contributes:
                contributed.update(numbers)
            if p.contiguous:
                local.update(
                    n
                    for n in numbers
                    if p.first <= n * block and n * block + block_length(reader.info, n) <= p.last
                )
        split = touched - local
        self.masked = (split & contributed) if reader.cooperative else set()
        self.whole = set() if reader.cooperative else split  # read whole, verify here
        self.checked_here = local | self.whole
        self._runs: list[tuple[int, int]] | None = None

    def verify_window(self, checked: memoryview, start: int, end: int, report: LoadReport) -> None:
        reader = self.reader
        for number in self._in_window(self.checked_here, start, end):
            begin = number * reader.block
            length = block_length(reader.info, number)
            if crc32c.crc32c(checked[begin : begin + length]) != reader.info.checksums[number]:
                raise checksum_error(str(reader.path), reader.index, reader.info, number)
            if number in self.whole:
                report.add(read=length - self._needed_in_block(begin, length))

    def mask_window(self, typed: torch.Tensor, start: int, end: int) -> _Staged | None:
        """This rank's masked crc of each split block in ``[start, end)``,
        with the masked rows (``None`` when no block here is split)."""
        numbers = self._in_window(self.masked, start, end)
        if not numbers:
            return None
        reader = self.reader
        first_row, end_row = start // reader.row_bytes, -(-end // reader.row_bytes)
        shape = (end_row - first_row, *reader.sizes[1:])
        writes = []
        for p in self.placed:
            low, high = max(first_row, p.rows[0]), min(end_row, p.rows[1])
            if p.target.contributes and low < high:
                writes.append((low - first_row, high - first_row, p.trailing))
        scratch = _scratch(math.prod(shape) * reader.itemsize, (reader.dtype, shape, writes))
        rows = scratch.view(reader.dtype).reshape(shape)
        for low, high, trailing in writes:
            window_rows = (slice(low, high), *trailing)
            rows[window_rows] = typed[(slice(low + first_row, high + first_row), *trailing)]
        data = writable_bytes(scratch)
        skip = first_row * reader.row_bytes
        masked = {}
        for number in numbers:
            begin = number * reader.block - skip
            length = block_length(reader.info, number)
            masked[(reader.index, number)] = int(crc32c.crc32c(data[begin : begin + length]))
        return _Staged(rows, first_row, masked)

    def _in_window(self, numbers: set[int], start: int, end: int) -> list[int]:
        block = self.reader.block
        return [n for n in range(start // block, -(-end // block)) if n in numbers]

    def _needed_in_block(self, begin: int, length: int) -> int:
        """Bytes of this rank's distinct regions inside ``[begin, begin + length)``."""
        if self._runs is None:
            reader = self.reader
            self._runs = [
                run
                for region in {p.target.region for p in self.placed}
                for run in byte_runs(reader.sizes, region, reader.itemsize)
            ]
        return sum(
            max(0, min(offset + run, begin + length) - max(offset, begin))
            for offset, run in self._runs
        )


_local = threading.local()


def _scratch(nbytes: int, pattern: object) -> torch.Tensor:
    """A zeroed byte buffer of ``nbytes``, owned by this thread and reused so
    masking does not fault in fresh pages for every block. ``pattern`` names
    the positions the caller will overwrite: when it is the same as last time,
    every other byte is still zero and the buffer is not cleared again."""
    buffer: torch.Tensor | None = getattr(_local, "scratch", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _local.scratch = torch.zeros(nbytes, dtype=torch.uint8)
        _local.pattern = pattern
    elif _local.pattern != pattern:
        buffer.zero_()
        _local.pattern = pattern
    return buffer[:nbytes]


def _aligned(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """The chunk's bytes at an address a dtype view accepts (the format does
    not promise aligned offsets; distcp's writer aligns to 64 bytes)."""
    if data.data_ptr() % itemsize:
        return data.clone()
    return data
