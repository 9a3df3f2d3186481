"""What ``distcp.save`` and ``distcp.load`` ask of a storage beyond DCP's
``StorageWriter`` / ``StorageReader`` interfaces, as protocols rather than
class names, so that any storage that does the job takes part (not only
:class:`~distcp.FileSystemWriter` / :class:`~distcp.FileSystemReader`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from distcp.filesystem.block_verification import BlockKey

__all__ = ["JointlyVerifyingReader", "ReleasingWriter"]


@runtime_checkable
class JointlyVerifyingReader(Protocol):
    """A reader whose checksum blocks split between ranks by a resharding
    load are verified by the ranks together: ``distcp.load`` sets it up with
    ``joint_verification=True``, gathers every rank's :meth:`masked_checksums`
    after reading, and hands them all to :meth:`verify_split_blocks` on every
    rank (docs/format.md §4)."""

    def set_up_storage_reader(
        self, metadata: Any, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None: ...

    def masked_checksums(self) -> Mapping[BlockKey, int]: ...

    def verify_split_blocks(self, contributions: list[dict[BlockKey, int]]) -> None: ...


@runtime_checkable
class ReleasingWriter(Protocol):
    """A writer that holds something for the length of a save (distcp's
    holds the directory's save lock): ``distcp.save`` calls :meth:`release`
    when the save ends, committed or not."""

    def release(self) -> None: ...
