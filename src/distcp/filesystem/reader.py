"""``FileSystemReader``: reads and validates a checkpoint's metadata, then reads
only the bytes a load plan needs, verifying checksums as it goes.

Blocks that a resharding load splits between ranks are verified together
after reading (:mod:`distcp.filesystem.block_verification`): ``distcp.load``
gathers every rank's :meth:`FileSystemReader.masked_checksums` and calls
:meth:`FileSystemReader.verify_split_blocks`. Code that drives ``read_data``
itself must do the same, or those blocks stay unverified.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from distcp import knobs
from distcp.codecs import decode_stored
from distcp.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    UnsupportedStorageError,
)
from distcp.filesystem.block_verification import (
    BlockKey,
    VerificationPlan,
    checksum_error,
    plan_block_verification,
    verify_masked_crcs,
)
from distcp.filesystem.chunk_reader import ChunkReader, ReadTarget
from distcp.filesystem.layout import (
    METADATA_FILE_NAME,
    PROBE_FILE_NAME,
    metadata_file_name,
    new_save_id,
)
from distcp.filesystem.load_report import LoadReport
from distcp.filesystem.tensor_bytes import checksum_mismatch, narrowed, require_little_endian
from distcp.geometry import Box
from distcp.metadata import (
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    TensorStorageMetadata,
)
from distcp.metadata_file import decode_metadata
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from distcp.storage import StorageReader, done_future
from distcp.stores import ByteStore, LocalStore, location_of, split_url, store_for
from distcp.stores.base import DataSource, SourceSet
from distcp.torch_dcp import TorchDcpCheckpoint, is_torch_dcp_checkpoint

__all__ = ["FileSystemReader", "LoadReport"]

log = logging.getLogger(__name__)

#: A reader thread drops the mapped pages of chunks it finished every this many bytes.
_RELEASE_EVERY = 8 << 20


class FileSystemReader(StorageReader):
    """Reads a checkpoint from a directory, or from any store's location
    (:mod:`distcp.stores`).

    Args:
        path: the checkpoint directory; also a URL (``s3://…``, ``memory://…``;
            see :class:`distcp.FsspecReader`) or a :class:`distcp.stores.ByteStore`.
        thread_count: reader threads per rank.
        verify_checksums: verify the crc32c of every block read (default). A block
            split between ranks is verified jointly from their masked crcs; a
            block only partly needed otherwise is read whole to verify it.
        storage_options: for a URL, passed to its fsspec file system.
    """

    _use_fsspec = False

    def __init__(
        self,
        path: str | os.PathLike[str] | ByteStore,
        _extension_registry: Any = None,
        *,
        thread_count: int = knobs.DEFAULT_THREAD_COUNT,
        verify_checksums: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        require_little_endian()
        # DCP's registry of stream transforms: zstd is built in; a chunk or value
        # written through another transform (codec "ext:<descriptor>") decodes
        # only through an extension registered here (distcp.codecs).
        self._extension_registry = _extension_registry
        self.load_id = new_save_id()
        self.storage_options = storage_options
        self.store = self._store_at(path)
        self.thread_count = max(1, thread_count)
        self.verify_checksums = verify_checksums
        self.metadata: Metadata | None = None
        self.report = LoadReport()
        self._file_sizes: dict[str, int] = {}
        self._masked: dict[BlockKey, int] = {}
        self._torch_dcp: TorchDcpCheckpoint | None = None  # set when the path is torch DCP's
        self._joint_verification = False

    def _store_at(self, location: str | os.PathLike[str] | ByteStore) -> ByteStore:
        return store_for(location, self.storage_options, use_fsspec=self._use_fsspec)

    @property
    def path(self) -> Path | str:
        """The checkpoint's location: a directory, or a URL for other stores."""
        return location_of(self.store)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.store = self._store_at(checkpoint_id)
        self.load_id = new_save_id()
        self.metadata = None
        self.report = LoadReport()
        self._masked = {}
        self._torch_dcp = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        if isinstance(checkpoint_id, ByteStore):
            return True
        scheme, rest = split_url(os.fspath(checkpoint_id))
        return scheme not in (None, "file") or Path(rest).is_dir()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        store = self.store
        if not store.holds_anything():
            raise CheckpointNotFoundError(
                f"no checkpoint at {store.location}: the path does not exist"
            )
        name = metadata_file_name(kwargs.get("rank"))
        self._torch_dcp = None
        try:
            payload = store.read_whole(name, "metadata file")
        except FileNotFoundError:
            # --- a checkpoint written by torch DCP: distcp.torch_dcp reads it ---
            self._torch_dcp = self._torch_dcp_checkpoint()
            if self._torch_dcp is not None:
                self.metadata = self._torch_dcp.metadata
                return self.metadata
            raise IncompleteCheckpointError(
                f"{store.location} holds no committed checkpoint ({name} is missing): "
                "a save into it did not finish, so its data files are not loadable."
            ) from None
        metadata, self._file_sizes = decode_metadata(payload, source=store.describe(name))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        self.metadata = metadata
        return metadata

    def _torch_dcp_checkpoint(self) -> TorchDcpCheckpoint | None:
        """The torch DCP checkpoint at a location without distcp metadata, if
        it holds one; raises when there is no checkpoint there at all."""
        store = self.store
        if isinstance(store, LocalStore):
            if not store.path.is_dir():
                raise CheckpointNotFoundError(f"{store.path} is not a checkpoint directory")
            if is_torch_dcp_checkpoint(store.path):
                return TorchDcpCheckpoint(store.path, thread_count=self.thread_count)
        elif store.exists(PROBE_FILE_NAME):
            raise UnsupportedStorageError(
                f"{store.location} holds a torch DCP checkpoint ({PROBE_FILE_NAME} without "
                f"{METADATA_FILE_NAME}); distcp reads torch DCP's format from local "
                "directories. Load it with storage_reader="
                "torch.distributed.checkpoint.FsspecReader(url), or copy it to a local directory"
            )
        return None

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """``joint_verification=True`` (only ``distcp.load`` passes it, and then
        calls :meth:`verify_split_blocks` after reading) lets ranks share the
        checksum work of blocks a resharding load splits between them. Driven
        by anything else (torch's ``dcp.load``), each rank reads every block it
        needs part of whole and verifies it alone, so no byte goes unverified."""
        self.metadata = metadata
        self._joint_verification = bool(kwargs.get("joint_verification", False)) and bool(
            kwargs.get("use_collectives", True)
        )

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        if (
            self.metadata is None
            or not self.verify_checksums
            or self._torch_dcp is not None
            or not self._joint_verification
        ):
            return plans
        verification = plan_block_verification(plans, self.metadata)
        return [
            replace(plan, storage_data=mine) for plan, mine in zip(plans, verification, strict=True)
        ]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        if self.metadata is None:
            raise CheckpointFormatError("read_data called before read_metadata")
        self.report = LoadReport()
        self._masked = {}
        if self._torch_dcp is not None:  # torch DCP's format: no checksums, no split blocks
            return self._torch_dcp.read_data(plan, planner, self.report)
        storage: dict[MetadataIndex, StorageInfo] = self.metadata.storage_data
        by_item: dict[MetadataIndex, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            if item.storage_index not in storage:
                raise CheckpointFormatError(
                    f"key {item.storage_index.fqn!r}: the plan reads item "
                    f"{item.storage_index.offset} which the checkpoint does not have"
                )
            by_item[item.storage_index].append(item)
        verification = plan.storage_data
        if not isinstance(verification, VerificationPlan):
            verification = VerificationPlan()  # no joint plan: verify every block alone

        lock = threading.Lock()
        sources = self.store.open_sources()
        try:
            self._check_files(sources, {storage[index].relative_path for index in by_item})
            if self.store.capabilities.mappable:
                self._read_mapped(sources, by_item, planner, lock, verification)
            else:
                self._read_fetched(sources, by_item, planner, lock, verification)
        finally:
            sources.close()
        log.debug(
            "distcp load: %d items, %d bytes needed, %d read (×%.3f), %d verified, "
            "%d blocks split between ranks",
            self.report.items,
            self.report.bytes_needed,
            self.report.bytes_read,
            self.report.read_amplification,
            self.report.bytes_verified,
            self.report.split_blocks,
        )
        return done_future(None)

    @property
    def file_sizes(self) -> dict[str, int]:
        """The size the metadata records for each data file (after
        :meth:`read_metadata`; empty for a torch DCP checkpoint)."""
        return dict(self._file_sizes)

    def masked_checksums(self) -> dict[BlockKey, int]:
        """This rank's masked crcs of the blocks it read in part, for
        :meth:`verify_split_blocks` on every rank."""
        return dict(self._masked)

    def verify_split_blocks(self, contributions: list[dict[BlockKey, int]]) -> None:
        """Verify every block split between ranks, given every rank's
        :meth:`masked_checksums`; raises :class:`CorruptCheckpointError`."""
        if self.metadata is None:
            raise CheckpointFormatError("verify_split_blocks called before read_metadata")
        if self._torch_dcp is not None:
            return  # torch DCP's format has no checksum blocks
        verify_masked_crcs(
            contributions, self.metadata.storage_data, self.store.location.rstrip("/")
        )
        self.report.settle()

    def _read_mapped(
        self,
        sources: SourceSet,
        by_item: dict[MetadataIndex, list[ReadItem]],
        planner: LoadPlanner,
        lock: threading.Lock,
        verification: VerificationPlan,
    ) -> None:
        """Mapped sources (local files): each reader thread works through its
        own stretch of the chunks in file order, reading straight from the
        files, and drops the pages behind it as it goes."""
        assert self.metadata is not None
        storage: dict[MetadataIndex, StorageInfo] = self.metadata.storage_data

        def read_bucket(bucket: list[tuple[MetadataIndex, list[ReadItem]]]) -> dict[BlockKey, int]:
            masked: dict[BlockKey, int] = {}
            behind: tuple[str, int] | None = None  # (file, offset): pages before it are done
            for index, items in bucket:
                info = storage[index]
                job = self._chunk_job(sources, index, items, planner, lock, verification)
                masked.update(job.run())
                end = info.offset + info.length
                if behind is None or behind[0] != info.relative_path:
                    behind = (info.relative_path, info.offset)
                elif end - behind[1] >= _RELEASE_EVERY:
                    sources.get(info.relative_path).release(behind[1], end)
                    behind = (info.relative_path, end)
            return masked

        buckets = _balanced(list(by_item.items()), self.thread_count, storage)
        if len(buckets) == 1:  # one thread's worth: no pool
            self._masked.update(read_bucket(buckets[0]))
            return
        with ThreadPoolExecutor(len(buckets), thread_name_prefix="distcp-read") as pool:
            for masked in pool.map(read_bucket, buckets):
                self._masked.update(masked)

    def _read_fetched(
        self,
        sources: SourceSet,
        by_item: dict[MetadataIndex, list[ReadItem]],
        planner: LoadPlanner,
        lock: threading.Lock,
        verification: VerificationPlan,
    ) -> None:
        """Sources that are fetched (object stores): the chunks in file order,
        in batches of about ``knobs.FETCH_BATCH`` stored bytes. Each batch's
        needed byte ranges are fetched (coalesced, many in flight) while the
        previous batch is verified and copied into place by the reader
        threads; then its memory is dropped."""
        assert self.metadata is not None
        storage: dict[MetadataIndex, StorageInfo] = self.metadata.storage_data
        ordered = sorted(
            by_item.items(),
            key=lambda task: (storage[task[0]].relative_path, storage[task[0]].offset),
        )
        batches: list[list[tuple[MetadataIndex, list[ReadItem]]]] = [[]]
        filled = 0
        for task in ordered:
            if filled >= knobs.FETCH_BATCH:
                batches.append([])
                filled = 0
            batches[-1].append(task)
            filled += storage[task[0]].length

        def prepare(
            batch: list[tuple[MetadataIndex, list[ReadItem]]],
        ) -> tuple[list[_ChunkJob], list[tuple[str, int, int]]]:
            jobs = [
                self._chunk_job(sources, index, items, planner, lock, verification)
                for index, items in batch
            ]
            return jobs, [span for job in jobs for span in job.spans()]

        with (
            ThreadPoolExecutor(self.thread_count, thread_name_prefix="distcp-read") as workers,
            ThreadPoolExecutor(1, thread_name_prefix="distcp-fetch-batch") as fetcher,
        ):
            current = prepare(batches[0])
            pending = fetcher.submit(sources.fetch, current[1])
            for number in range(len(batches)):
                self.report.add(fetched=pending.result())
                jobs, ranges = current
                if number + 1 < len(batches):  # fetch the next batch while this one decodes
                    current = prepare(batches[number + 1])
                    pending = fetcher.submit(sources.fetch, current[1])
                for masked in workers.map(_ChunkJob.run, jobs):
                    self._masked.update(masked)
                sources.drop(ranges)

    def _check_files(self, sources: SourceSet, names: set[str]) -> None:
        """Before reading anything: every file this rank reads opens as a
        regular file inside the checkpoint (no symbolic link, no FIFO) and has
        the size the metadata recorded (catches truncation and replacement).
        The checked descriptors are the ones the reads use."""
        for name in sorted(names):
            path = self.store.describe(name)
            expected = self._file_sizes.get(name)
            actual = sources.get(name).size
            if expected is not None and actual != expected:
                raise CorruptCheckpointError(
                    f"data file {path} is {actual} bytes but the metadata records {expected} "
                    f"(truncated or replaced; first difference at offset {min(actual, expected)})",
                    file=str(path),
                    offset=min(actual, expected),
                )

    def _chunk_job(
        self,
        sources: SourceSet,
        index: MetadataIndex,
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
        verification: VerificationPlan,
    ) -> _ChunkJob:
        """What reading one saved item takes: the byte ranges of its file it
        touches, and the work that verifies them and puts them in place."""
        assert self.metadata is not None
        info: StorageInfo = self.metadata.storage_data[index]
        name = info.relative_path

        def whole() -> list[tuple[str, int, int]]:
            return [(name, info.offset, info.offset + info.length)]

        source = sources.get(name)
        if items[0].type == LoadItemType.BYTE_IO:
            return _ChunkJob(
                whole, lambda: self._read_value(source, index, info, items, planner, lock)
            )
        entry = self.metadata.state_dict_metadata[index.fqn]
        assert isinstance(entry, TensorStorageMetadata) and index.offset is not None
        chunk = next(c for c in entry.chunks if tuple(c.offsets) == index.offset)
        sizes = tuple(chunk.sizes)
        if info.codec is not None:
            return _ChunkJob(
                whole,
                lambda: self._read_compressed(
                    source, index, info, entry, sizes, items, planner, lock
                ),
            )
        targets = []
        contributors = verification.contributes  # empty unless the load reshards
        for item in items:
            with lock:
                dest = planner.resolve_tensor(item)
            region = Box(tuple(item.storage_offsets), tuple(item.lengths))
            contributes = bool(contributors) and (index, region.offsets) in contributors
            targets.append(ReadTarget(region, dest, contributes))
        reader = ChunkReader(
            source,
            index,
            info,
            entry.properties.dtype,
            sizes,
            verify=self.verify_checksums,
            cooperative=bool(verification.cooperative) and index in verification.cooperative,
        )

        def run() -> dict[BlockKey, int]:
            masked = reader.read(targets, self.report)
            self.report.add(items=len(items), split_blocks=len(masked))
            for item, target in zip(items, targets, strict=True):
                with lock:
                    planner.commit_tensor(item, target.dest)
            return masked

        def spans() -> list[tuple[str, int, int]]:
            return [
                (name, info.offset + a, info.offset + b) for a, b in reader.needed_spans(targets)
            ]

        return _ChunkJob(spans, run)

    def _read_compressed(
        self,
        source: DataSource,
        index: MetadataIndex,
        info: StorageInfo,
        entry: TensorStorageMetadata,
        sizes: tuple[int, ...],
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
    ) -> dict[BlockKey, int]:
        """A chunk stored with a codec (zstd, a stream transform): read whole,
        verify its stored bytes, decode, then copy each needed region out
        (:mod:`distcp.codecs`)."""
        stored = bytearray(info.length)
        source.read_into(memoryview(stored), info.offset)
        path = str(source.path)
        if self.verify_checksums:
            bad = checksum_mismatch(memoryview(stored), 0, info.checksums, info.checksum_block_size)
            if bad is not None:
                raise checksum_error(path, index, info, bad, detail=f" (a {info.codec} chunk)")
        dtype = entry.properties.dtype
        numel = 1
        for size in sizes:
            numel *= size
        assert info.codec is not None
        raw = decode_stored(
            info.codec,
            stored,
            numel * dtype.itemsize,
            registry=self._extension_registry,
            file=path,
            offset=info.offset,
        )
        whole = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).view(sizes)
            if numel
            else torch.empty(sizes, dtype=dtype)
        )
        needed = 0
        for item in items:
            part = narrowed(whole, item.storage_offsets, item.lengths)
            with lock:
                dest = planner.resolve_tensor(item)
            dest.copy_(part)
            needed += part.numel() * dtype.itemsize
            with lock:
                planner.commit_tensor(item, dest)
        self.report.add(needed=needed, read=info.length, items=len(items))
        if self.verify_checksums:
            self.report.add(verified=info.length)
        return {}

    def _read_value(
        self,
        file: DataSource,
        index: MetadataIndex,
        info: StorageInfo,
        items: list[ReadItem],
        planner: LoadPlanner,
        lock: threading.Lock,
    ) -> dict[BlockKey, int]:
        data = bytearray(info.length)
        file.read_into(memoryview(data), info.offset)
        self.report.add(needed=info.length, read=info.length, items=len(items))
        if self.verify_checksums:
            bad = checksum_mismatch(memoryview(data), 0, info.checksums, info.checksum_block_size)
            if bad is not None:
                raise checksum_error(str(file.path), index, info, bad)
            self.report.add(verified=info.length)
        if info.codec is not None:  # a stream transform over every item
            data = bytearray(
                decode_stored(
                    info.codec,
                    data,
                    None,
                    registry=self._extension_registry,
                    file=str(file.path),
                    offset=info.offset,
                )
            )
        for item in items:
            with lock:
                planner.load_bytes(item, io.BytesIO(bytes(data)))
        return {}


@dataclass(frozen=True)
class _ChunkJob:
    """One saved item's read: the ``(file, start, end)`` byte ranges it
    touches (worked out only for stores that fetch) and the work that verifies
    them and puts them in place (returning this rank's masked crcs of blocks
    split between ranks)."""

    spans: Callable[[], list[tuple[str, int, int]]]
    work: Callable[[], dict[BlockKey, int]]

    def run(self) -> dict[BlockKey, int]:
        return self.work()


def _balanced(
    tasks: list[tuple[MetadataIndex, list[ReadItem]]],
    threads: int,
    storage: dict[MetadataIndex, StorageInfo],
) -> list[list[tuple[MetadataIndex, list[ReadItem]]]]:
    """The chunks in file order, cut into at most ``threads`` runs of about
    equal bytes, one run per reader thread: a thread works through its own
    stretch of each file, so thousands of small chunks cost no future each and
    the pages behind it can be released in bulk."""
    ordered = sorted(
        tasks, key=lambda task: (storage[task[0]].relative_path, storage[task[0]].offset)
    )
    cost = [storage[index].length + 4096 for index, _ in ordered]  # a chunk costs some work too
    share = sum(cost) / max(1, min(threads, len(ordered)))
    buckets: list[list[tuple[MetadataIndex, list[ReadItem]]]] = [[]]
    filled = 0.0
    for task, weight in zip(ordered, cost, strict=True):
        if filled >= share and len(buckets) < threads:
            buckets.append([])
            filled = 0.0
        buckets[-1].append(task)
        filled += weight
    return buckets
