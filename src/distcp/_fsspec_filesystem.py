"""DCP's ``FsspecWriter`` / ``FsspecReader`` names: distcp's format on any
fsspec file system (``torch.distributed.checkpoint._fsspec_filesystem``'s
twin). Extra keyword arguments are fsspec's ``storage_options`` (endpoint,
credentials), as in torch DCP. distcp's :class:`FileSystemWriter` and
:class:`FileSystemReader` take URLs too; these always go through fsspec, even
for a local path."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch.distributed.checkpoint.filesystem import SerializationFormat

from distcp import knobs
from distcp.filesystem.reader import FileSystemReader
from distcp.filesystem.writer import FileSystemWriter
from distcp.stores import ByteStore, split_url

__all__ = ["FsspecReader", "FsspecWriter"]


def _known_protocol(checkpoint_id: str | os.PathLike[str]) -> bool:
    if isinstance(checkpoint_id, ByteStore):
        return True
    try:
        import fsspec
    except ImportError:
        return False
    scheme, _ = split_url(os.fspath(checkpoint_id))
    return scheme is None or scheme in fsspec.available_protocols()


class FsspecWriter(FileSystemWriter):
    """Writes distcp's format through fsspec (``s3://``, ``gs://``, ``az://``,
    ``memory://``, …). Parameters as torch DCP's ``FsspecWriter``, plus
    distcp's keyword-only ones; ``part_size`` and ``upload_concurrency``
    shape S3 multipart uploads (defaults: ``knobs.UPLOAD_PART_SIZE``,
    ``knobs.UPLOAD_CONCURRENCY``); any other keyword is a storage option."""

    _use_fsspec = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = knobs.DEFAULT_THREAD_COUNT,
        per_thread_copy_ahead: int = 10_000_000,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        *,
        checksum_block_size: int = knobs.CHECKSUM_BLOCK_SIZE,
        part_size: int = knobs.UPLOAD_PART_SIZE,
        upload_concurrency: int = knobs.UPLOAD_CONCURRENCY,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            single_file_per_rank,
            sync_files,
            thread_count,
            per_thread_copy_ahead,
            False,
            overwrite,
            _extensions,
            serialization_format,
            checksum_block_size=checksum_block_size,
            storage_options=storage_options,
            part_size=part_size,
            upload_concurrency=upload_concurrency,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _known_protocol(checkpoint_id)


class FsspecReader(FileSystemReader):
    """Reads distcp's format through fsspec, fetching only the byte ranges a
    load needs. Keywords other than distcp's are storage options."""

    _use_fsspec = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        _extension_registry: Any = None,
        *,
        thread_count: int = knobs.DEFAULT_THREAD_COUNT,
        verify_checksums: bool = True,
        **storage_options: Any,
    ) -> None:
        super().__init__(
            path,
            _extension_registry,
            thread_count=thread_count,
            verify_checksums=verify_checksums,
            storage_options=storage_options,
        )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _known_protocol(checkpoint_id)
