"""Reading only the byte ranges a load needs from objects that cannot be mapped.

The reader tells a :class:`RangedSources` which ranges of which objects the
next batch of chunks needs (:meth:`RangedSources.fetch`). Ranges of one object
closer than ``knobs.COALESCE_GAP`` are merged, long ones are split into
``knobs.READ_PART_SIZE`` pieces, and ``knobs.READ_CONCURRENCY`` of them are in
flight at once. Each object's fetched bytes land in a sparse anonymous mapping
of the object's size (:class:`FetchedObject`): only the pages written are
backed by memory, so the format's readers (``ChunkReader``) work on it exactly
as on a mapped local file, and what was fetched is dropped again after the
batch (:meth:`RangedSources.drop`). Reading a byte that was never fetched is
a bug, not zeros: it raises.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import mmap
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from distcp import knobs
from distcp.errors import CheckpointError, CorruptCheckpointError

__all__ = ["FetchedObject", "RangedSources", "coalesce"]

_PAGE = mmap.PAGESIZE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)

#: ``read(name, start, end) -> bytes``: one ranged read of an object.
RangeReader = Callable[[str, int, int], bytes]


def coalesce(ranges: Iterable[tuple[int, int]], gap: int, part: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges merged where less than ``gap`` bytes apart (or
    overlapping), then cut into pieces of at most ``part`` bytes, in order."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and start - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces = []
    for start, end in merged:
        for at in range(start, end, part):
            pieces.append((at, min(at + part, end)))
    return pieces


class FetchedObject:
    """One object's fetched ranges, in a sparse mapping of its full size."""

    def __init__(self, name: str, path: str, size: int) -> None:
        self.name = name
        self.path = path
        self.size = size
        self._mapping: mmap.mmap | None = None
        self._bytes = torch.empty(0, dtype=torch.uint8)
        if size:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE
            self._mapping = mmap.mmap(-1, size, flags=flags)
            self._bytes = torch.frombuffer(self._mapping, dtype=torch.uint8)
        self._starts: list[int] = []  # fetched ranges, sorted, disjoint
        self._ends: list[int] = []
        self._lock = threading.Lock()

    @property
    def bytes(self) -> torch.Tensor:
        return self._bytes

    def put(self, start: int, data: builtins.bytes) -> None:
        """Place fetched bytes ``data`` at ``start``."""
        end = start + len(data)
        if end > self.size:
            raise CorruptCheckpointError(
                f"{self.path}: a read at {start} returned {len(data)} bytes, past the "
                f"object's {self.size}",
                file=self.path,
                offset=start,
            )
        if data:
            assert self._mapping is not None
            self._mapping[start:end] = data
        with self._lock:
            self._add(start, end)

    def _add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        with self._lock:
            i = bisect.bisect_right(self._starts, start) - 1
            return i >= 0 and self._ends[i] >= end

    def read_into(self, buffer: memoryview, offset: int) -> None:
        end = offset + len(buffer)
        if not self.covers(offset, end):
            raise CheckpointError(
                f"internal error: bytes [{offset}, {end}) of {self.path} were read "
                "before they were fetched"
            )
        if len(buffer):
            torch.frombuffer(buffer, dtype=torch.uint8).copy_(self._bytes[offset:end])

    def prefetch(self, start: int, end: int) -> None:
        return None  # fetched ahead by the batch

    def release(self, start: int, end: int) -> None:
        """Return the memory of the whole pages inside ``[start, end)``; the
        range counts as not fetched any more."""
        begin, stop = -(-start // _PAGE) * _PAGE, min(end, self.size) // _PAGE * _PAGE
        if self._mapping is not None and begin < stop:
            self._mapping.madvise(mmap.MADV_DONTNEED, begin, stop - begin)
        with self._lock:
            self._remove(start, end)

    def _remove(self, start: int, end: int) -> None:
        kept_starts, kept_ends = [], []
        for s, e in zip(self._starts, self._ends, strict=True):
            if e <= start or s >= end:
                kept_starts.append(s)
                kept_ends.append(e)
                continue
            if s < start:
                kept_starts.append(s)
                kept_ends.append(start)
            if e > end:
                kept_starts.append(end)
                kept_ends.append(e)
        self._starts, self._ends = kept_starts, kept_ends

    def close(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self._mapping.close()


class RangedSources:
    """The objects one load reads, fetched range by range into memory.

    ``sizes``: each object's size (from one listing); ``read``: one ranged
    read; ``describe``: an object's URL for messages."""

    def __init__(
        self,
        sizes: Callable[[], dict[str, int]],
        read: RangeReader,
        describe: Callable[[str], str],
    ) -> None:
        self._sizes = sizes
        self._listed: dict[str, int] | None = None
        self._read = read
        self._describe = describe
        self._objects: dict[str, FetchedObject] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(knobs.READ_CONCURRENCY, thread_name_prefix="distcp-fetch")

    def get(self, name: str) -> FetchedObject:
        with self._lock:
            found = self._objects.get(name)
            if found is None:
                if self._listed is None:
                    self._listed = self._sizes()
                size = self._listed.get(name)
                path = self._describe(name)
                if size is None:
                    raise CorruptCheckpointError(
                        f"data object {path} is missing", file=path, offset=0
                    )
                found = self._objects[name] = FetchedObject(name, path, size)
            return found

    def fetch(self, ranges: Iterable[tuple[str, int, int]]) -> int:
        by_object: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for name, start, end in ranges:
            by_object[name].append((start, end))
        jobs = []
        for name, spans in by_object.items():
            target = self.get(name)
            for start, end in coalesce(spans, knobs.COALESCE_GAP, knobs.READ_PART_SIZE):
                if end > target.size:
                    raise CorruptCheckpointError(
                        f"data object {target.path} is {target.size} bytes; the metadata "
                        f"records bytes up to {end}",
                        file=target.path,
                        offset=target.size,
                    )
                jobs.append((target, start, end))
        return sum(self._pool.map(self._fetch_one, jobs))

    def _fetch_one(self, job: tuple[FetchedObject, int, int]) -> int:
        target, start, end = job
        try:
            data = self._read(target.name, start, end)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"data object {target.path} is missing", file=target.path, offset=start
            ) from None
        if len(data) != end - start:
            raise CorruptCheckpointError(
                f"data object {target.path} ends at byte {start + len(data)}, before the "
                f"{end - start} bytes the metadata records at offset {start}",
                file=target.path,
                offset=start + len(data),
            )
        target.put(start, data)
        return len(data)

    def drop(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Release, per object, everything from the first to the last byte of
        ``ranges`` (the gaps fetched with them included). A batch's ranges
        are a stretch of each object that no other batch's lie inside."""
        spans: dict[str, tuple[int, int]] = {}
        for name, start, end in ranges:
            low, high = spans.get(name, (start, end))
            spans[name] = (min(low, start), max(high, end))
        for name, (start, end) in spans.items():
            found = self._objects.get(name)
            if found is not None:
                found.release(start, end)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for found in self._objects.values():
                found.close()
            self._objects.clear()
