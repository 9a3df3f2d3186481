"""Byte stores: where the verified format's bytes live (DESIGN §2).

:func:`store_for` turns a ``checkpoint_id`` into a store: a local path (or a
``file://`` URL) is a :class:`LocalStore`, with every fast path of local
disk; any other URL (``s3://``, ``gs://``, ``az://``, ``memory://``, any
fsspec protocol) is an :class:`FsspecStore`. Nothing above the format layer
knows a store by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distcp.errors import CheckpointArgumentError
from distcp.stores.base import ByteStore, DataSink, DataSource, SourceSet, StoreCapabilities
from distcp.stores.local import LocalStore

__all__ = [
    "ByteStore",
    "DataSink",
    "DataSource",
    "LocalStore",
    "SourceSet",
    "StoreCapabilities",
    "location_of",
    "split_url",
    "store_for",
]


def split_url(location: str) -> tuple[str | None, str]:
    """``(scheme, rest)`` of a URL, or ``(None, location)`` for a plain path."""
    scheme, separator, rest = location.partition("://")
    if not separator or "/" in scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        return None, location
    return scheme.lower(), rest


def store_for(
    location: str | os.PathLike[str] | ByteStore,
    storage_options: dict[str, Any] | None = None,
    *,
    use_fsspec: bool = False,
    **store_options: Any,
) -> ByteStore:
    """The store for a checkpoint location.

    ``use_fsspec`` sends even a local path through fsspec (DCP's
    ``FsspecWriter``/``FsspecReader``); ``storage_options`` go to the fsspec
    file system; ``store_options`` (``part_size``, ``upload_concurrency``) to
    the :class:`FsspecStore`.
    """
    if isinstance(location, ByteStore):
        return location
    if not isinstance(location, (str, os.PathLike)):
        raise CheckpointArgumentError(
            f"checkpoint_id must be a path or a URL string, got {type(location).__name__}"
        )
    text = os.fspath(location)
    scheme, rest = split_url(text)
    if not use_fsspec and not storage_options and scheme in (None, "file"):
        return LocalStore(rest)
    from distcp.stores.fsspec_store import FsspecStore  # fsspec is an optional extra

    return FsspecStore(text, storage_options, **store_options)


def location_of(store: ByteStore) -> Path | str:
    """Where a storage says its checkpoint is (``path``, ``checkpoint_id``):
    the directory for a local store, the URL for any other."""
    return store.path if isinstance(store, LocalStore) else store.location
