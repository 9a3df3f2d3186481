"""``async_save``: checkpoint without stopping training for the write.

The call plans the save (every rank, over the async saver's own gloo group, so
its collectives never interleave with the training's), then stages the items
of this rank's final plan into a reusable host arena (:mod:`distcp.staging`)
and returns a future. What remains runs in the background, exactly as in
:func:`distcp.save`: the data files are written from the snapshot, then the
coordinator commits once every rank succeeded.

Where the writing happens is ``async_checkpointer_type``'s choice:

- ``THREAD`` (default): a background thread of this process.
- ``PROCESS``: a writer process (:mod:`distcp.writer_process`) reading the
  snapshot from shared memory, so checksums and file I/O never contend with
  training for this process's GIL; a thread here waits for it and commits.

One async save runs at a time per process: a call made while the previous one
is still writing waits for it first (its arena is about to be reused).
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from distcp.api import PlannedSave, _coordinator, commit_save, plan_save, storage_for
from distcp.filesystem.writer import FileSystemWriter
from distcp.gc_pause import gc_paused
from distcp.metadata import STATE_DICT_TYPE, Metadata
from distcp.planner import SavePlanner
from distcp.save_planner import DefaultSavePlanner
from distcp.staging import StagedPlanner, StagingBuffers
from distcp.storage import StorageWriter, WriteResult, wait_future
from distcp.writer_process import WriterProcess

__all__ = ["AsyncCheckpointerType", "async_save", "staging_buffers", "writer_process"]


class AsyncCheckpointerType(enum.Enum):
    """Where the background save is written (torch DCP's names)."""

    THREAD = "thread"
    PROCESS = "process"


class _AsyncSaver:
    """The per-process background machinery of one checkpointer type."""

    def __init__(self, kind: AsyncCheckpointerType) -> None:
        self.kind = kind
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="distcp-async-save")
        self.buffers = StagingBuffers(shared=kind is AsyncCheckpointerType.PROCESS)
        self.pending: Future[Metadata] | None = None
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.process: WriterProcess | None = None

    def group_for(self, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
        """A gloo group over the same ranks, for the async saves' own use."""
        ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))  # type: ignore[arg-type]
        group = self.groups.get(ranks)
        if group is None:
            group = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
            self.groups[ranks] = group
        return group

    def stage_and_write(
        self, planned: PlannedSave, planner: SavePlanner
    ) -> Callable[[], list[WriteResult]]:
        """Finish this rank's plan and stage its items now; return the write
        step for the background. A failure here becomes that step's error, so
        every rank learns of it when they exchange results and nothing is
        committed."""
        try:
            final_plan = planner.finish_plan(planned.central_plan)
            staged = self.buffers.stage(final_plan, planner)
            if self.kind is AsyncCheckpointerType.PROCESS and (
                self.process is None or not self.process.alive()
            ):
                self.process = WriterProcess()
        except Exception as error:
            failure = error

            def fail() -> list[WriteResult]:
                raise failure

            return fail
        arena = self.buffers.arena
        assert arena is not None
        writer, process = planned.writer, self.process
        if process is None:
            staged_planner = StagedPlanner(staged, arena.memory)
            return lambda: wait_future(writer.write_data(final_plan, staged_planner))
        return lambda: process.write(writer, final_plan, staged, arena)


_savers: dict[AsyncCheckpointerType, _AsyncSaver] = {}
_lock = threading.Lock()


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
    """Plan and stage ``state_dict``, then save it in the background; every
    rank calls it.

    Returns once this rank's part of the state is copied into host memory: the
    caller may then modify its tensors (the checkpoint holds them as they were
    at the call). The future resolves to the checkpoint's metadata once it is
    committed, or raises what :func:`distcp.save` would have raised (nothing
    is committed then, and the previous checkpoint at the path stays loadable).
    With ``AsyncCheckpointerType.PROCESS`` the storage writer must pickle.
    """
    with _lock:
        for other in _savers.values():  # one async save at a time, whatever its type
            if other.pending is not None:
                other.pending.exception()  # wait; its outcome belongs to its own future
        saver = _savers.get(async_checkpointer_type)
        if saver is None:
            saver = _savers[async_checkpointer_type] = _AsyncSaver(async_checkpointer_type)
        writer = storage_for(storage_writer, checkpoint_id, FileSystemWriter, "storage_writer")
        distributed = not no_dist and dist.is_available() and dist.is_initialized()
        group = saver.group_for(process_group) if distributed else None
        planner = planner or DefaultSavePlanner()
        ranks = _coordinator(group, not distributed, 0)
        with gc_paused():
            try:
                planned = plan_save(state_dict, writer, planner, ranks)
            except Exception as error:  # the same error on every rank: nothing to write
                failed: Future[Metadata] = Future()
                failed.set_exception(error)
                return failed
            write = saver.stage_and_write(planned, planner)
        saver.pending = saver.executor.submit(commit_save, planned, write)
        return saver.pending


def staging_buffers(
    kind: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
) -> StagingBuffers | None:
    """This process's staging arena for async saves of ``kind`` (for
    inspection), or None before the first such save."""
    saver = _savers.get(kind)
    return saver.buffers if saver is not None else None


def writer_process() -> WriterProcess | None:
    """This process's async-save writer process (for inspection), or None
    before the first ``AsyncCheckpointerType.PROCESS`` save."""
    saver = _savers.get(AsyncCheckpointerType.PROCESS)
    return saver.process if saver is not None else None
