"""The byte-store interface the verified format is written over (DESIGN §2).

The format (packing, alignment, checksums, metadata, the commit protocol,
verified and resharding reads: :mod:`distcp.filesystem.writer` and
:mod:`distcp.filesystem.reader`) asks a store for a handful of things: named
objects written front to back (:class:`DataSink`), byte ranges of named
objects (:class:`DataSource`), a listing, deletion, and one atomic
"publish this object" step for the commit. What differs between stores is
stated up front in :class:`StoreCapabilities` rather than discovered as
``NotImplementedError``: the format picks its path from the flags.

The model is zarr-python's ``abc/store.py``; the names here are distcp's.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "ByteStore",
    "DataSink",
    "DataSource",
    "SaveLock",
    "SourceSet",
    "StoreCapabilities",
]


@dataclass(frozen=True)
class StoreCapabilities:
    """What a store can do, so the format chooses its path instead of failing.

    mappable: a :class:`DataSource` exposes the object's bytes as a mapping
        that faults in only the pages touched (local files), so a reader reads
        straight from it; otherwise the reader fetches the byte ranges a load
        needs (coalesced, many in flight) before decoding them.
    writeback: a :class:`DataSink` can start writing to the medium early and
        make an object durable (fsync); otherwise ``close`` alone makes it so.
    atomic_rename: :meth:`ByteStore.publish` writes a temporary and renames
        it (local); otherwise one whole-object put is the atomic step.
    conditional_create: :meth:`ByteStore.publish` with ``if_absent`` is one
        atomic operation (S3 ``If-None-Match``); otherwise it checks, then
        writes, and two savers racing with ``overwrite=False`` may both
        succeed.
    ranged_reads: byte ranges are read without reading whole objects.
    locking: :meth:`ByteStore.lock` keeps a second save out of the location
        while one runs; otherwise one save at a time is the caller's to ensure.
    """

    mappable: bool
    writeback: bool
    atomic_rename: bool
    conditional_create: bool
    ranged_reads: bool
    locking: bool


class DataSink(Protocol):
    """One object being written front to back by one writer thread."""

    def write(self, data: memoryview | bytes) -> None: ...

    def close(self) -> None:
        """Finish the object: after this returns it is complete (and durable,
        where the store was asked to sync)."""

    def abort(self) -> None:
        """Give up the object: nothing of it is left behind where the store
        can tell (a multipart upload is aborted, a partial file removed)."""


class DataSource(Protocol):
    """Byte access to one object, as the format's chunk reader uses it."""

    size: int

    @property
    def path(self) -> str | os.PathLike[str]:
        """Where it is, for messages."""

    @property
    def bytes(self) -> torch.Tensor:
        """The object's bytes as a uint8 tensor (a read-only mapping)."""

    def read_into(self, buffer: memoryview, offset: int) -> None: ...

    def prefetch(self, start: int, end: int) -> None: ...

    def release(self, start: int, end: int) -> None: ...


class SourceSet(Protocol):
    """The objects one load reads, each opened once, closed together."""

    def get(self, name: str) -> DataSource: ...

    def fetch(self, ranges: Iterable[tuple[str, int, int]]) -> int:
        """Make the byte ranges ``(name, start, end)`` readable from their
        sources; return the bytes transferred. A no-op (0) where sources are
        mappable."""

    def drop(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Forget fetched ranges (their memory returns)."""

    def close(self) -> None: ...


class SaveLock(Protocol):
    """What a committing rank holds for the length of a save."""

    def release(self) -> None: ...


class _NoLock:
    def release(self) -> None:
        return None


NO_LOCK: SaveLock = _NoLock()


class ByteStore(ABC):
    """A flat namespace of objects under one checkpoint location."""

    capabilities: StoreCapabilities

    @property
    @abstractmethod
    def location(self) -> str:
        """The checkpoint's location as the user named it (path or URL)."""

    @abstractmethod
    def describe(self, name: str) -> str:
        """Where object ``name`` is, for messages (a path or a URL)."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the location ready to be written (create the directory)."""

    @abstractmethod
    def holds_anything(self) -> bool:
        """Whether the location exists and holds anything at all."""

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def read_whole(self, name: str, what: str) -> bytes:
        """The whole object ``name`` (small ones: metadata). Raises
        :class:`FileNotFoundError` when it is missing and
        :class:`~distcp.errors.CorruptCheckpointError` when it is not a
        plain object (a link, a FIFO)."""

    @abstractmethod
    def list(self) -> dict[str, int]:
        """The objects directly under the location, with their sizes."""

    @abstractmethod
    def create(self, name: str, *, sync: bool) -> DataSink: ...

    @abstractmethod
    def open_sources(self) -> SourceSet: ...

    @abstractmethod
    def publish(
        self, name: str, data: bytes, *, temporary_name: str, sync: bool, if_absent: bool = False
    ) -> OSError | None:
        """Put ``data`` at ``name`` atomically: readers see the old object or
        the whole new one. This is a commit point: an error before it takes
        effect is raised (``name`` unchanged), one after (the directory fsync
        of a local store) is returned. With ``if_absent`` an existing object
        raises :class:`FileExistsError` (atomically where
        ``capabilities.conditional_create``)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove object ``name``; a missing one is not an error."""

    def lock(self, name: str) -> SaveLock:
        """Keep other saves out of the location until released; ``name`` is
        the lock's object name. Stores without ``locking`` hold nothing."""
        return NO_LOCK
