"""``async_save``: checkpoint without stopping training for the write.

The call plans the save (every rank, over the async saver's own gloo group, so
its collectives never interleave with the training's), then stages the items
of this rank's final plan into a reusable host arena (:mod:`distcp.staging_arena`)
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

``async_stager`` is DCP's: distcp's :class:`distcp.staging.DefaultStager` keeps
the planned staging above with its options (``use_async_staging`` makes the
copy itself run in the background, and the call returns an
``AsyncSaveResponse``); any other ``AsyncStager`` (torch's, a user's) stages
the state dict its own way and distcp saves its copy in the background.
``AsyncCheckpointerType`` and ``AsyncSaveResponse`` are torch DCP's classes.
"""

from __future__ import annotations

import contextvars
import datetime
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from distcp.api import (
    PlannedSave,
    _coordinator,
    accepts_old_argument_order,
    commit_save,
    plan_save,
    save,
    storage_for,
)
from distcp.distributed import resolve_timeout, timed_group
from distcp.filesystem.writer import FileSystemWriter
from distcp.gc_pause import gc_paused
from distcp.metadata import STATE_DICT_TYPE, Metadata
from distcp.planner import SavePlanner
from distcp.save_planner import DefaultSavePlanner
from distcp.staging import AsyncStager, DefaultStager
from distcp.staging_arena import StagedPlanner, StagingBuffers
from distcp.storage import StorageWriter, WriteResult, wait_future
from distcp.telemetry import phase
from distcp.writer_process import WriterProcess

__all__ = [
    "AsyncCheckpointerType",
    "AsyncSaveResponse",
    "async_save",
    "staging_buffers",
    "writer_process",
]


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
        self, planned: PlannedSave, planner: SavePlanner, after: Any = None
    ) -> Callable[[], list[WriteResult]]:
        """Finish this rank's plan and stage its items now; return the write
        step for the background. A failure here becomes that step's error, so
        every rank learns of it when they exchange results and nothing is
        committed."""
        try:
            final_plan = planner.finish_plan(planned.central_plan)
            staged = self.buffers.stage(final_plan, planner, after=after)
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


@accepts_old_argument_order("storage_writer")
def async_save(
    state_dict: STATE_DICT_TYPE,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    async_checkpointer_type: AsyncCheckpointerType = AsyncCheckpointerType.THREAD,
    async_stager: AsyncStager | None = None,
    no_dist: bool = False,
    use_collectives: bool = True,
    timeout: float | datetime.timedelta | None = None,
) -> Future[Any] | AsyncSaveResponse:
    """Plan and stage ``state_dict``, then save it in the background; every
    rank calls it.

    Returns once this rank's part of the state is copied into host memory: the
    caller may then modify its tensors (the checkpoint holds them as they were
    at the call). The future resolves to the checkpoint's metadata once it is
    committed, or raises what :func:`distcp.save` would have raised (nothing
    is committed then, and the previous checkpoint at the path stays loadable).
    With ``AsyncCheckpointerType.PROCESS`` the storage writer must pickle.

    With a stager that stages in the background (``DefaultStager`` with
    ``use_async_staging``, the default of DCP's ``StagingOptions``) it returns
    at once an ``AsyncSaveResponse``: wait on ``staging_completion`` before
    changing the state, on ``upload_completion`` for the commit.
    ``use_collectives=False`` saves rank-locally, as :func:`distcp.save`;
    ``timeout`` bounds each wait for the other ranks, as there.
    """
    if not isinstance(async_checkpointer_type, AsyncCheckpointerType):
        async_checkpointer_type = AsyncCheckpointerType(
            getattr(async_checkpointer_type, "value", async_checkpointer_type)
        )
    if async_stager is None and isinstance(storage_writer, AsyncStager):
        async_stager = storage_writer  # DCP: a writer that stages is its own stager
    if async_stager is not None and not isinstance(async_stager, DefaultStager):
        return _save_foreign_staged(
            state_dict, async_stager, checkpoint_id, storage_writer, planner, process_group,
            no_dist, use_collectives, timeout,
        )  # fmt: skip
    background = async_stager is not None and async_stager.config.use_async_staging
    with _lock:
        _wait_for_pending()
        saver = _saver(async_checkpointer_type)
        writer = storage_for(storage_writer, checkpoint_id, FileSystemWriter, "storage_writer")
        distributed = not no_dist and dist.is_available() and dist.is_initialized()
        group = saver.group_for(process_group) if distributed else None
        if group is not None:  # made here, not in the background: ranks create groups in step
            timed_group(group, resolve_timeout(timeout))
        if not use_collectives:
            pending = saver.executor.submit(
                save,
                state_dict,
                storage_writer=writer,
                planner=planner,
                process_group=group,
                no_dist=not distributed,
                use_collectives=False,
                timeout=timeout,
            )  # fmt: skip  (a rank-local save plans alone: all of it can run in the background)
            saver.pending = pending
            return pending
        planner = planner or DefaultSavePlanner()
        ranks = _coordinator(group, not distributed, 0, timeout)
        with gc_paused():
            try:
                with phase("plan"):
                    planned = plan_save(state_dict, writer, planner, ranks)
            except Exception as error:  # the same error on every rank: nothing to write
                failed: Future[Metadata] = Future()
                failed.set_exception(error)
                return failed
            if not background:
                with phase("stage"):
                    write = saver.stage_and_write(planned, planner)
                # The caller's context goes along: a telemetry recording around
                # async_save also times the background write and commit.
                context = contextvars.copy_context()
                saver.pending = saver.executor.submit(context.run, commit_save, planned, write)
                return saver.pending
        staged: Future[None] = Future()
        caller_stream = torch.cuda.current_stream() if torch.cuda.is_available() else None

        def stage_then_commit() -> Metadata:
            with gc_paused():
                try:
                    write = saver.stage_and_write(planned, planner, after=caller_stream)
                finally:
                    staged.set_result(None)
            return commit_save(planned, write)

        saver.pending = saver.executor.submit(stage_then_commit)
        return AsyncSaveResponse(staging_completion=staged, upload_completion=saver.pending)  # type: ignore[arg-type]


def _wait_for_pending() -> None:
    for other in _savers.values():  # one async save at a time, whatever its type
        if other.pending is not None:
            other.pending.exception()  # wait; its outcome belongs to its own future


def _saver(kind: AsyncCheckpointerType) -> _AsyncSaver:
    saver = _savers.get(kind)
    if saver is None:
        saver = _savers[kind] = _AsyncSaver(kind)
    return saver


def _save_foreign_staged(
    state_dict: STATE_DICT_TYPE,
    stager: AsyncStager,
    checkpoint_id: str | os.PathLike[str] | None,
    storage_writer: StorageWriter | None,
    planner: SavePlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    use_collectives: bool,
    timeout: float | datetime.timedelta | None,
) -> Future[Any] | AsyncSaveResponse:
    """A stager distcp does not know: it makes the host copy (now, or as a
    future), and :func:`distcp.save` writes that copy from a background thread
    over the async saver's own group, as DCP's thread checkpointer does."""
    with _lock:
        _wait_for_pending()
        saver = _saver(AsyncCheckpointerType.THREAD)
        writer = storage_for(storage_writer, checkpoint_id, FileSystemWriter, "storage_writer")
        distributed = not no_dist and dist.is_available() and dist.is_initialized()
        group = saver.group_for(process_group) if distributed else None
        if group is not None:  # made here, not in the background: ranks create groups in step
            timed_group(group, resolve_timeout(timeout))
        staged = stager.stage(state_dict)

        def save_copy() -> Metadata:
            copy = staged.result() if isinstance(staged, Future) else staged
            return save(
                copy, storage_writer=writer, planner=planner, process_group=group,
                no_dist=not distributed, use_collectives=use_collectives, timeout=timeout,
            )  # fmt: skip

        saver.pending = saver.executor.submit(save_copy)
        if isinstance(staged, Future):
            staging_done: Future[None] = Future()
            staged.add_done_callback(lambda _: staging_done.set_result(None))
            upload: Any = saver.pending  # resolves to the Metadata (DCP types it None)
            return AsyncSaveResponse(staging_completion=staging_done, upload_completion=upload)
        if stager.should_synchronize_after_execute:
            stager.synchronize_staging()
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
