"""``FileSystemWriter``: writes each rank's items to its own data files and
commits the checkpoint atomically (DESIGN §4)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import SerializationFormat

from distcp import knobs
from distcp.codecs import codec_for_extensions
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointExistsError,
    CommitWarning,
    UnsupportedStorageError,
)
from distcp.filesystem.device_copies import PinnedStager, StagedItem
from distcp.filesystem.directory_lock import lock_file_name
from distcp.filesystem.layout import (
    PROBE_TEXT,
    data_file_name,
    is_data_file_name,
    is_temporary_metadata_name,
    metadata_file_name,
    new_save_id,
    probe_file_name,
    temporary_metadata_name,
)
from distcp.filesystem.tensor_bytes import block_checksums, host_bytes, require_little_endian
from distcp.metadata import Metadata, StorageInfo, StorageMeta
from distcp.metadata_file import encode_metadata
from distcp.planner import SavePlan, SavePlanner, WriteItem, WriteItemType, item_nbytes
from distcp.storage import StorageWriter, WriteResult, done_future
from distcp.stores import ByteStore, location_of, store_for
from distcp.stores.base import NO_LOCK, DataSink, SaveLock

__all__ = ["FileSystemWriter"]

log = logging.getLogger("distcp")


@dataclass(frozen=True)
class RankFiles:
    """What the coordinator tells each rank in ``prepare_global_plan``: the save
    id its file names carry, and its rank number in them."""

    save_id: str
    rank: int


class FileSystemWriter(StorageWriter):
    """Writes a checkpoint into a directory on a (shared) file system, or
    under any store's location (:mod:`distcp.stores`).

    The parameters are torch DCP's, in DCP's order, plus distcp's keyword-only
    ones; an unknown keyword raises ``TypeError``.

    Args:
        path: the checkpoint directory (created if missing); also a URL
            (``s3://…``, ``memory://…``; an fsspec store, see
            :class:`distcp.FsspecWriter`) or a :class:`distcp.stores.ByteStore`.
        single_file_per_rank: one data file per writer thread (True) or one per item.
        sync_files: fsync data and metadata before the commit is reported.
        thread_count: writer threads per rank.
        per_thread_copy_ahead: accepted for DCP compatibility; each thread
            stages device tensors one item ahead through two pinned buffers.
        cache_staged_state_dict: accepted for DCP compatibility: ``async_save``
            always reuses its staging arena.
        overwrite: replace a committed checkpoint at ``path``; with False, a save
            into a committed checkpoint raises :class:`CheckpointExistsError`.
        _extensions: DCP's stream transforms, one at most. ``[ZStandard()]`` stores
            each tensor chunk as one zstd frame (raw where that is not smaller; values
            stay raw); any other ``StreamTransformExtension`` is applied to every item,
            and loading needs ``FileSystemReader(_extension_registry=...)`` holding it.
            See :mod:`distcp.codecs`.
        serialization_format: DCP's choice between ``torch.save`` and
            safetensors framing of each tensor. distcp writes raw bytes either
            way; only the default is accepted, ``SAFETENSORS`` raises naming
            the storage that writes safetensors files.
        checksum_block_size: bytes covered by each crc32c checksum.
        storage_options: for a URL, passed to its fsspec file system
            (endpoint, credentials).
        part_size, upload_concurrency: multipart uploads to S3 (default:
            ``knobs.UPLOAD_PART_SIZE``, ``knobs.UPLOAD_CONCURRENCY``).
    """

    _use_fsspec = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = knobs.DEFAULT_THREAD_COUNT,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        overwrite: bool = True,
        _extensions: Sequence[Any] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        *,
        checksum_block_size: int = knobs.CHECKSUM_BLOCK_SIZE,
        storage_options: dict[str, Any] | None = None,
        part_size: int = knobs.UPLOAD_PART_SIZE,
        upload_concurrency: int = knobs.UPLOAD_CONCURRENCY,
    ) -> None:
        if thread_count < 1:
            raise CheckpointArgumentError(f"thread_count must be at least 1, got {thread_count}")
        if checksum_block_size < 1:
            raise CheckpointArgumentError(
                f"checksum_block_size must be positive, got {checksum_block_size}"
            )
        if serialization_format != SerializationFormat.TORCH_SAVE:
            raise UnsupportedStorageError(
                f"FileSystemWriter(serialization_format={serialization_format}): distcp's "
                "format stores raw tensor bytes, not safetensors framing. To write safetensors "
                "files pass storage_writer=distcp.HuggingFaceStorageWriter(path) (torch's)"
            )
        require_little_endian()
        self.storage_options = storage_options
        self._store_options = {"part_size": part_size, "upload_concurrency": upload_concurrency}
        self.store = self._store_at(path)
        self.single_file_per_rank = single_file_per_rank
        self.sync_files = sync_files
        self.thread_count = thread_count
        self.per_thread_copy_ahead = per_thread_copy_ahead
        self.cache_staged_state_dict = cache_staged_state_dict
        self.overwrite = overwrite
        self._codec = codec_for_extensions(_extensions)
        self.checksum_block_size = checksum_block_size
        self.rank = 0
        self.is_coordinator = False
        self.use_collectives = True
        self.save_id: str | None = None
        self._lock: SaveLock = NO_LOCK

    def _store_at(self, location: str | os.PathLike[str] | ByteStore) -> ByteStore:
        return store_for(
            location, self.storage_options, use_fsspec=self._use_fsspec, **self._store_options
        )

    @property
    def path(self) -> Path | str:
        """The checkpoint's location: a directory, or a URL for other stores."""
        return location_of(self.store)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.store = self._store_at(checkpoint_id)
        self.save_id = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike, ByteStore))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))
        self.use_collectives = bool(kwargs.get("use_collectives", True))
        committing = is_coordinator or not self.use_collectives
        self.store.prepare()
        if not committing:
            return
        # Held until finish() or release(): one save at a time in a directory
        # (stores that cannot lock hold nothing; see StoreCapabilities.locking).
        self.release()
        self._lock = self.store.lock(lock_file_name(None if self.use_collectives else self.rank))
        if not self.overwrite and self.store.exists(self._metadata_name()):
            self.release()
            raise self._exists_error()

    def _exists_error(self) -> CheckpointExistsError:
        return CheckpointExistsError(
            f"Checkpoint already exists at {self.store.location} ({self._metadata_name()}) "
            "and overwrite=False; choose another path or pass FileSystemWriter(path, "
            "overwrite=True)"
        )

    @property
    def codec(self) -> str | None:
        """The codec items are stored with (docs/format.md §2): ``"zstd"``,
        ``"ext:<descriptor>"`` for another stream transform, or None."""
        return None if self._codec is None else self._codec.name

    def release(self) -> None:
        """End this writer's hold on its directory (the lock a committing rank
        takes at set-up, so that two saves never run into one directory at
        once). ``finish`` releases it; ``distcp.save`` also calls this when a
        save fails, and a writer that is dropped releases it too."""
        lock, self._lock = self._lock, NO_LOCK
        lock.release()

    def _metadata_name(self) -> str:
        return metadata_file_name(None if self.use_collectives else self.rank)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.save_id = new_save_id()
        if not self.use_collectives:  # this rank's own plan, alone
            return [
                replace(plan, storage_data=RankFiles(self.save_id, self.rank)) for plan in plans
            ]
        return [
            replace(plan, storage_data=RankFiles(self.save_id, rank))
            for rank, plan in enumerate(plans)
        ]

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        files = plan.storage_data
        if not isinstance(files, RankFiles):
            files = RankFiles(self.save_id or new_save_id(), self.rank)
        self.save_id = files.save_id
        buckets = self._buckets(plan.items)
        names = [data_file_name(files.save_id, files.rank, n) for n in range(len(buckets))]
        try:
            with ThreadPoolExecutor(self.thread_count, thread_name_prefix="distcp-write") as pool:
                parts = list(pool.map(self._write_file, names, buckets, [planner] * len(names)))
        except BaseException:
            for name in names:
                try:
                    self.store.delete(name)
                except OSError as error:  # the error that matters is the one raised
                    log.warning("distcp: removing %s failed: %s", self.store.describe(name), error)
            raise
        return done_future([result for part in parts for result in part])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage_data = {result.index: result.storage_data for part in results for result in part}
        metadata.storage_data = storage_data
        save_id = self.save_id or new_save_id()
        payload = encode_metadata(metadata, save_id=save_id, world_size=len(results))
        name = self._metadata_name()
        try:
            unsynced = self.store.publish(
                name,
                payload,
                temporary_name=temporary_metadata_name(save_id, name),
                sync=self.sync_files,
                if_absent=not self.overwrite,
            )
        except FileExistsError:
            # Another save committed here first (a conditional create lost the
            # race): that checkpoint stands; this save's data files go.
            self.release()
            for info in storage_data.values():
                with contextlib.suppress(OSError):
                    self.store.delete(info.relative_path)
            raise self._exists_error() from None
        except BaseException:
            self.release()
            raise
        # Committed: the rename put the new metadata in place, so from here on
        # nothing may report the save as failed (docs/format.md §7). What
        # fails now is a CommitWarning. The probe is written only now, so it
        # never marks an incomplete checkpoint; a failed later save leaves it
        # and the metadata it stands for both in place.
        if unsynced is not None:
            warn_after_commit(
                self.store.location,
                f"fsyncing the directory failed ({unsynced}); the new checkpoint "
                "is in place but may not survive a power loss",
            )
        probe = probe_file_name(None if self.use_collectives else self.rank)
        try:
            error = self.store.publish(
                probe,
                PROBE_TEXT,
                temporary_name=temporary_metadata_name(save_id, probe),
                sync=self.sync_files,
            )
        except OSError as raised:
            error = raised
        if error is not None:
            warn_after_commit(
                self.store.location,
                f"writing its {probe} (the marker checkpoint managers probe for) failed: {error}",
            )
        referenced = {info.relative_path for info in storage_data.values()}
        try:
            self._remove_superseded(referenced)
        except OSError as error:
            warn_after_commit(self.store.location, f"removing superseded files failed: {error}")
        finally:
            self.release()

    def _buckets(self, items: list[WriteItem]) -> list[list[WriteItem]]:
        """Split items over files: per item, or over one file per thread with
        the bytes balanced (largest first onto the lightest file)."""
        if not self.single_file_per_rank:
            return [[item] for item in items]
        count = max(1, min(self.thread_count, len(items)))
        buckets: list[list[WriteItem]] = [[] for _ in range(count)]
        loads = [0] * count
        for item in sorted(items, key=item_nbytes, reverse=True):
            lightest = loads.index(min(loads))
            buckets[lightest].append(item)
            loads[lightest] += item_nbytes(item)
        return [bucket for bucket in buckets if bucket] or [[]]

    def _write_file(
        self, name: str, items: list[WriteItem], planner: SavePlanner
    ) -> list[WriteResult]:
        sink = self.store.create(name, sync=self.sync_files)
        try:
            results = self._write_items(sink, name, items, planner)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return results

    def _write_items(
        self, sink: DataSink, name: str, items: list[WriteItem], planner: SavePlanner
    ) -> list[WriteResult]:
        results = []
        block = self.checksum_block_size
        stager = PinnedStager()
        position = 0
        # Stay one item ahead: a device tensor's copy to pinned memory runs
        # while the previous item is written.
        upcoming = [_item_data(item, planner, stager) for item in items[:1]]
        for n, item in enumerate(items):
            if n + 1 < len(items):
                upcoming.append(_item_data(items[n + 1], planner, stager))
            data = upcoming.pop(0).ready()
            _check_size(item, data)
            codec: str | None = None
            if self._codec is not None and (
                item.type != WriteItemType.BYTE_IO or self._codec.values_too
            ):
                encoded = self._codec.encode(data)
                if encoded is not None:  # else stored raw (zstd that did not shrink)
                    data, codec = memoryview(encoded), self._codec.name
            padding = -position % knobs.CHUNK_ALIGNMENT
            if padding:
                sink.write(bytes(padding))
                position += padding
            sink.write(data)
            checksums = block_checksums(data, block)
            info = StorageInfo(name, position, len(data), checksums, block, codec)
            results.append(WriteResult(item.index, len(data), info))
            position += len(data)
            del data  # written: do not hold its bytes while the next item is resolved
        return results

    def _remove_superseded(self, referenced: set[str]) -> None:
        """After a commit, delete data files no committed metadata references
        (earlier saves, failed saves) and temporary metadata of crashed saves.
        A rank-local commit removes only its own rank's data files and
        temporaries: the other ranks' metadata still references their files,
        and they may be committing at this moment. The probe is never removed."""
        own = f"-{self.rank:05d}-"
        rank = None if self.use_collectives else self.rank
        failed: list[str] = []
        for name in self.store.list():
            stale_data = is_data_file_name(name) and name not in referenced
            if stale_data and rank is not None and own not in name:
                continue
            if stale_data or is_temporary_metadata_name(name, rank):
                try:
                    self.store.delete(name)
                except OSError as error:  # go on with the others
                    failed.append(f"{name}: {error}")
        if failed:
            raise OSError(f"{len(failed)} file(s) not removed: " + "; ".join(failed[:3]))


def warn_after_commit(path: Path | str, problem: str) -> None:
    """A failure after the commit point: logged and issued as a
    :class:`CommitWarning`, never raised (the checkpoint at ``path`` is the
    new one, and a caller told otherwise would retry or discard it)."""
    message = f"distcp: committed {path}, but {problem}"
    log.warning("%s", message)
    warnings.warn(message, CommitWarning, stacklevel=3)


def _item_data(item: WriteItem, planner: SavePlanner, stager: PinnedStager) -> StagedItem:
    data = planner.resolve_data(item)
    if item.type == WriteItemType.BYTE_IO:
        if isinstance(data, torch.Tensor):
            raise CheckpointError(
                f"key {item.index.fqn!r}: resolve_data returned a tensor for a BYTE_IO item"
            )
        return StagedItem(data.getbuffer())
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(
            f"key {item.index.fqn!r}: resolve_data returned {type(data).__name__} for a tensor item"
        )
    if data.is_cuda:
        return stager.stage(data)
    return StagedItem(host_bytes(data))


def _check_size(item: WriteItem, data: memoryview) -> None:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return
    expected = item_nbytes(item)
    if len(data) != expected:
        raise CheckpointError(
            f"key {item.index.fqn!r}: resolve_data returned {len(data)} bytes but the plan "
            f"says {expected} (shape or dtype changed between planning and writing)"
        )
