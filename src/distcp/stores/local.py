"""The local (or shared POSIX) file system as a byte store, with its fast
paths: data written from the tensor's memory through a large buffer, early
writeback (``sync_file_range``) and fsync; reads through a read-only mapping
or ``pread`` straight into place (:mod:`distcp.filesystem.file_mappings`);
files opened without following links (:mod:`distcp.filesystem.safe_open`);
the commit by rename; a ``flock`` keeping a second save out
(:mod:`distcp.filesystem.directory_lock`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from distcp import knobs
from distcp.filesystem.directory_lock import DirectoryLock
from distcp.filesystem.file_mappings import FileMappings
from distcp.filesystem.layout import write_atomically
from distcp.filesystem.safe_open import read_regular_file
from distcp.filesystem.writeback import start_writeback
from distcp.stores.base import ByteStore, DataSink, SaveLock, SourceSet, StoreCapabilities

__all__ = ["LocalStore"]


class LocalStore(ByteStore):
    """Objects are the files of one directory."""

    capabilities = StoreCapabilities(
        mappable=True,
        writeback=True,
        atomic_rename=True,
        conditional_create=False,
        ranged_reads=True,
        locking=True,
    )

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    def describe(self, name: str) -> str:
        return str(self.path / name)

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def holds_anything(self) -> bool:
        return self.path.exists()

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path / name)

    def read_whole(self, name: str, what: str) -> bytes:
        if not os.path.lexists(self.path / name):
            raise FileNotFoundError(str(self.path / name))
        return read_regular_file(self.path / name, what)

    def list(self) -> dict[str, int]:
        found: dict[str, int] = {}
        with os.scandir(self.path) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # removed meanwhile
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    def create(self, name: str, *, sync: bool) -> DataSink:
        return _FileSink(self.path / name, sync=sync)

    def open_sources(self) -> SourceSet:
        return _LocalSources(self.path)

    def publish(
        self, name: str, data: bytes, *, temporary_name: str, sync: bool, if_absent: bool = False
    ) -> OSError | None:
        # The rename replaces; with if_absent the caller holds the directory's
        # lock, so nothing else commits between this check and the rename.
        if if_absent and self.exists(name):
            raise FileExistsError(str(self.path / name))
        return write_atomically(self.path / name, data, temporary_name, sync=sync)

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def lock(self, name: str) -> SaveLock:
        lock = DirectoryLock()
        lock.acquire(self.path / name)
        return lock


class _FileSink:
    """A data file written through a large buffer; with ``sync``, its dirty
    pages start towards the disk every ``WRITEBACK_EVERY`` bytes and the file
    is fsynced at the end."""

    def __init__(self, path: Path, *, sync: bool) -> None:
        self.path = path
        self.sync = sync
        self.file = open(path, "wb", buffering=knobs.WRITE_BUFFER_SIZE)  # noqa: SIM115
        self.position = 0
        self.started = 0  # bytes before it are already being written back

    def write(self, data: memoryview | bytes) -> None:
        self.file.write(data)
        self.position += len(data)
        if self.sync and self.position - self.started >= knobs.WRITEBACK_EVERY:
            self.file.flush()
            start_writeback(self.file.fileno(), self.started, self.position - self.started)
            self.started = self.position

    def close(self) -> None:
        try:
            self.file.flush()
            if self.sync:
                os.fsync(self.file.fileno())
        finally:
            self.file.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


class _LocalSources(FileMappings):
    """Local files are mapped: nothing is fetched ahead."""

    def fetch(self, ranges: Iterable[tuple[str, int, int]]) -> int:
        return 0

    def drop(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        return None
