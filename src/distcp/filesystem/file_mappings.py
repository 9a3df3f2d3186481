"""Data files mapped read-only, once per load, shared by the reader threads.

Each file is mapped whole (copy-on-write, never written) the first time a
chunk in it is read. Pages a chunk has finished with are dropped from this
process with ``MADV_DONTNEED`` (they stay in the page cache), so resident
memory stays bounded by what the threads are working on, not by the state.
Only pages lying wholly inside the chunk are dropped: a neighbouring chunk
sharing a boundary page may be in use by another thread.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

import torch

__all__ = ["FileMappings", "MappedFile"]

_PAGE = mmap.PAGESIZE


class MappedFile:
    """One data file's bytes as a uint8 tensor over a read-only mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            self.mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) if size else None
        self.bytes = (
            torch.frombuffer(self.mapping, dtype=torch.uint8)
            if self.mapping is not None
            else torch.empty(0, dtype=torch.uint8)
        )

    def prefetch(self, start: int, end: int) -> None:
        """Ask the kernel to start reading file bytes ``[start, end)``."""
        begin, stop = start // _PAGE * _PAGE, min(end, len(self.bytes))
        if self.mapping is not None and begin < stop:
            self.mapping.madvise(mmap.MADV_WILLNEED, begin, stop - begin)

    def release(self, start: int, end: int) -> None:
        """Drop from this process the pages lying wholly inside file bytes
        ``[start, end)``."""
        begin, stop = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if self.mapping is not None and begin < stop:
            self.mapping.madvise(mmap.MADV_DONTNEED, begin, stop - begin)

    def close(self) -> None:
        del self.bytes
        if self.mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self.mapping.close()


class FileMappings:
    """The files one load maps, each mapped once, closed together."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, MappedFile] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> MappedFile:
        with self._lock:
            mapped = self._files.get(name)
            if mapped is None:
                mapped = self._files[name] = MappedFile(self.directory / name)
            return mapped

    def close(self) -> None:
        with self._lock:
            for mapped in self._files.values():
                mapped.close()
            self._files.clear()
