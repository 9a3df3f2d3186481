"""Any fsspec file system as a byte store: S3 (s3fs), GCS (gcsfs), Azure
(adlfs), ``memory://``, ``file://`` and every other fsspec protocol.

There is no rename on an object store, and none is needed: data objects
have names unique to their save, and the metadata object, written last in
one put, is the commit (docs/format.md §7). Reads fetch only the byte ranges
a load needs (:mod:`distcp.stores.ranged_reads`).

On S3 (s3fs) data objects are parallel multipart uploads
(:mod:`distcp.stores.multipart`), and ``overwrite=False`` is a conditional
put (``If-None-Match: *``) that a concurrent saver cannot race. Elsewhere the
refusal is check-then-write.

Credentials and endpoints come from where the protocol's package looks
(environment variables, config files, instance metadata) or from
``storage_options``; distcp never logs them.
"""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any

from distcp import knobs
from distcp.errors import UnsupportedStorageError
from distcp.stores.base import ByteStore, DataSink, SourceSet, StoreCapabilities
from distcp.stores.multipart import MultipartSink
from distcp.stores.ranged_reads import RangedSources

__all__ = ["FsspecStore", "install_hint"]

#: The package each common protocol needs, for the hint when it is missing.
_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}


def install_hint(protocol: str) -> str:
    extra = "s3" if _PACKAGES.get(protocol) == "s3fs" else "all"
    package = _PACKAGES.get(protocol, "fsspec")
    return f"pip install 'distcp[{extra}]' (or pip install fsspec {package})"


def _url_to_fs(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    protocol = url.partition("://")[0] if "://" in url else "file"
    try:
        import fsspec.core
    except ImportError:
        raise UnsupportedStorageError(
            f"{url}: object storage needs fsspec; {install_hint(protocol)}"
        ) from None
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as error:
        raise UnsupportedStorageError(
            f"{url}: the {protocol}:// protocol needs a package that is not installed "
            f"({error}); {install_hint(protocol)}"
        ) from None
    except ValueError as error:
        raise UnsupportedStorageError(f"{url}: {error}") from None
    return fs, str(root)


class _StreamSink:
    """A data object written through fsspec's own file object (one stream)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.file = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        self.file.write(data)

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        try:
            discard = getattr(self.file, "discard", None)
            try:
                if discard is None:
                    raise RuntimeError("no discard")
                discard()  # an upload that never becomes visible
            except RuntimeError:  # written in place (autocommit): close, then remove
                self.file.close()
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm_file(self.path)


class FsspecStore(ByteStore):
    """Objects under one fsspec URL prefix.

    Args:
        url: ``s3://bucket/prefix``, ``gs://…``, ``memory://…``, ``file://…``, …
        storage_options: passed to the protocol's file system (endpoint,
            credentials, region, …); when empty, the package's own defaults
            (environment variables, config files) apply.
        part_size, upload_concurrency: multipart uploads on S3 (``knobs``).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_size: int = knobs.UPLOAD_PART_SIZE,
        upload_concurrency: int = knobs.UPLOAD_CONCURRENCY,
    ) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.fs, root = _url_to_fs(url, self.storage_options)
        self.root = root.rstrip("/") or root
        self._s3 = hasattr(self.fs, "call_s3") and hasattr(self.fs, "split_path")
        self.capabilities = StoreCapabilities(
            mappable=False,
            writeback=False,
            atomic_rename=False,
            conditional_create=self._s3,
            ranged_reads=True,
            locking=False,
        )

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        """A store sent to another process (the writer process of an async
        save) is rebuilt there from its URL and options."""
        return (
            _rebuild,
            (self.url, self.storage_options, self.part_size, self.upload_concurrency),
        )

    @property
    def location(self) -> str:
        return self.url

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def describe(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def _fresh(self) -> None:
        """Forget cached listings: other ranks and other jobs write here."""
        self.fs.invalidate_cache(self.root)

    def prepare(self) -> None:
        if not self._s3:  # buckets are not created implicitly; directories are
            self.fs.makedirs(self.root, exist_ok=True)

    def holds_anything(self) -> bool:
        self._fresh()
        try:
            return bool(self.fs.ls(self.root, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return False

    def exists(self, name: str) -> bool:
        self._fresh()
        return bool(self.fs.exists(self._path(name)))

    def read_whole(self, name: str, what: str) -> bytes:
        self._fresh()
        data = self.fs.cat_file(self._path(name))
        return bytes(data)

    def list(self) -> dict[str, int]:
        self._fresh()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[str, int] = {}
        for entry in entries:
            if entry.get("type") == "directory":
                continue
            found[posixpath.basename(entry["name"].rstrip("/"))] = int(entry.get("size") or 0)
        return found

    def create(self, name: str, *, sync: bool) -> DataSink:
        path = self._path(name)
        if self._s3:
            bucket, key, _ = self.fs.split_path(path)
            return MultipartSink(
                self.fs.call_s3,
                bucket,
                key,
                part_size=self.part_size,
                concurrency=self.upload_concurrency,
            )
        return _StreamSink(self.fs, path)

    def open_sources(self) -> SourceSet:
        return RangedSources(self.list, self._read_range, self.describe)

    def _read_range(self, name: str, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self._path(name), start=start, end=end))

    def publish(
        self, name: str, data: bytes, *, temporary_name: str, sync: bool, if_absent: bool = False
    ) -> OSError | None:
        path = self._path(name)
        if self._s3:
            bucket, key, _ = self.fs.split_path(path)
            extra = {"IfNoneMatch": "*"} if if_absent else {}
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **extra)
            self.fs.invalidate_cache(path)
            return None
        if if_absent and self.exists(name):  # check-then-write: see the module docstring
            raise FileExistsError(self.describe(name))
        self.fs.pipe_file(path, data)
        return None

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))


def _rebuild(
    url: str, storage_options: dict[str, Any], part_size: int, upload_concurrency: int
) -> FsspecStore:
    return FsspecStore(
        url, storage_options, part_size=part_size, upload_concurrency=upload_concurrency
    )
