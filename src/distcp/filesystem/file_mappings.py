"""Data files opened once per load and shared by the reader threads.

Each file is opened the first time a chunk in it is read. A reader either
``pread``\\ s bytes straight into a destination (:meth:`OpenFile.read_into`,
the path for a contiguous region landing in a contiguous tensor) or copies them
out of the file's read-only mapping (:attr:`OpenFile.bytes`, mapped on first
use: strided regions, casts, masked checksums). Mapped pages a chunk has
finished with are dropped from this process with ``MADV_DONTNEED`` (they stay in
the page cache), so resident memory stays bounded by what the threads are
working on, not by the state. Only pages lying wholly inside the chunk are
dropped: a neighbouring chunk sharing a boundary page may be in use by another
thread.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

import torch

from distcp.errors import CorruptCheckpointError
from distcp.filesystem.safe_open import open_regular_file

__all__ = ["FileMappings", "OpenFile"]

_PAGE = mmap.PAGESIZE


_HAS_FADVISE = hasattr(os, "posix_fadvise")


class OpenFile:
    """One data file: a descriptor for ``pread`` and, once asked for, its bytes
    as a uint8 tensor over a read-only mapping. Opened without following a
    symbolic link and checked to be a regular file (:mod:`.safe_open`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = open_regular_file(path, "data file")
        self.size = os.fstat(self.fd).st_size
        self._mapping: mmap.mmap | None = None
        self._bytes: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def bytes(self) -> torch.Tensor:
        """The whole file, mapped read-only (copy-on-write, never written)."""
        if self._bytes is None:
            with self._lock:
                if self._bytes is None:
                    if self.size:
                        self._mapping = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_COPY)
                        self._bytes = torch.frombuffer(self._mapping, dtype=torch.uint8)
                    else:
                        self._bytes = torch.empty(0, dtype=torch.uint8)
        return self._bytes

    def read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset``."""
        _read_exactly(self.fd, buffer, offset, self.path)

    def prefetch(self, start: int, end: int) -> None:
        """Ask the kernel to start reading file bytes ``[start, end)``."""
        stop = min(end, self.size)
        if start < stop and _HAS_FADVISE:  # absent on macOS: a hint, nothing more
            os.posix_fadvise(self.fd, start, stop - start, os.POSIX_FADV_WILLNEED)

    def release(self, start: int, end: int) -> None:
        """Drop from this process the mapped pages lying wholly inside file
        bytes ``[start, end)``."""
        begin, stop = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if self._mapping is not None and begin < stop:
            self._mapping.madvise(mmap.MADV_DONTNEED, begin, stop - begin)

    def close(self) -> None:
        self._bytes = None
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self._mapping.close()
        os.close(self.fd)


class FileMappings:
    """The files one load opens, each opened once, closed together."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, OpenFile] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> OpenFile:
        with self._lock:
            opened = self._files.get(name)
            if opened is None:
                opened = self._files[name] = OpenFile(self.directory / name)
            return opened

    def close(self) -> None:
        with self._lock:
            for opened in self._files.values():
                opened.close()
            self._files.clear()


def _read_exactly(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
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
