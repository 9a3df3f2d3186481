"""``async_save``: checkpoint without stopping training for the write.

The call stages the state into reusable host buffers (:mod:`distcp.staging`)
and returns a future; a background thread then plans, writes and commits the
snapshot exactly as :func:`distcp.save` does. The background save coordinates
over its own gloo group (created once per process group, on the first call),
so its collectives never interleave with the training's. One async save runs
at a time per process: a call made while the previous one is still writing
waits for it first (its buffers are about to be reused).
"""

from __future__ import annotations

import enum
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from distcp.api import _resolve_stateful, _save, _storage
from distcp.filesystem.writer import FileSystemWriter
from distcp.metadata import STATE_DICT_TYPE, Metadata
from distcp.planner import SavePlanner
from distcp.staging import StagingBuffers
from distcp.storage import StorageWriter

__all__ = ["AsyncCheckpointerType", "async_save"]


class AsyncCheckpointerType(enum.Enum):
    """Where the background save runs (torch DCP's names). Only ``THREAD`` is
    implemented; ``PROCESS`` raises ``NotImplementedError``."""

    THREAD = "thread"
    PROCESS = "process"


class _AsyncSaver:
    """The per-process background writer, its buffers and its groups."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="distcp-async-save")
        self.buffers = StagingBuffers()
        self.pending: Future[Metadata] | None = None
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.lock = threading.Lock()

    def group_for(self, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        """A gloo group over the same ranks, for the background save's own use."""
        ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))  # type: ignore[arg-type]
        group = self.groups.get(ranks)
        if group is None:
            group = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
            self.groups[ranks] = group
        return group


_saver: _AsyncSaver | None = None


def _the_saver() -> _AsyncSaver:
    global _saver
    if _saver is None:
        _saver = _AsyncSaver()
    return _saver


def async_save(
    state_dict: STATE_DICT_TYPE,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    async_checkpointer_type: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
    no_dist: bool = False,
) -> Future[Metadata]:
    """Stage ``state_dict`` and save it in the background; every rank calls it.

    Returns once the state is copied into host buffers: the caller may then
    modify its tensors (the checkpoint holds them as they were at the call).
    The future resolves to the checkpoint's metadata once it is committed, or
    raises what :func:`distcp.save` would have raised (nothing is committed
    then, and the previous checkpoint at the path stays loadable).
    """
    if async_checkpointer_type is not AsyncCheckpointerType.THREAD:
        raise NotImplementedError(
            f"async_checkpointer_type={async_checkpointer_type}: distcp saves in a background "
            "thread only (AsyncCheckpointerType.THREAD)"
        )
    saver = _the_saver()
    with saver.lock:
        if saver.pending is not None:
            saver.pending.exception()  # wait; its outcome belongs to its own future
        writer = _storage(storage_writer, checkpoint_id, FileSystemWriter, "storage_writer")
        distributed = not no_dist and dist.is_available() and dist.is_initialized()
        group = saver.group_for(process_group) if distributed else None
        staged = saver.buffers.stage(_resolve_stateful(state_dict))
        saver.pending = saver.executor.submit(
            _save, staged, writer, planner, group, not distributed, 0
        )
        return saver.pending


def staging_buffers() -> StagingBuffers:
    """This process's async-save staging buffers (for inspection)."""
    return _the_saver().buffers
