"""``save`` and ``load``: the DCP protocol, step by step, and nothing else.

Save, on every rank unless noted: ``planner.set_up_planner`` →
``writer.set_up_storage_writer`` → ``planner.create_local_plan`` →
``writer.prepare_local_plan``; coordinator: ``planner.create_global_plan`` →
``writer.prepare_global_plan``; every rank: ``planner.finish_plan`` →
``writer.write_data``; coordinator, once every rank wrote: ``writer.finish`` (the commit).

Load, on every rank unless noted: ``reader.read_metadata`` →
``planner.set_up_planner`` → ``reader.set_up_storage_reader`` →
``planner.create_local_plan`` → ``reader.prepare_local_plan``; coordinator:
``planner.create_global_plan`` → ``reader.prepare_global_plan``; every rank:
``planner.finish_plan`` → ``reader.read_data``; then, for a
``FileSystemReader``, every rank verifies the checksum blocks that were split
between ranks from all ranks' masked crcs.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from distcp.distributed import Coordinator
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointException,
    CheckpointNotFoundError,
    CommitOutcomeUnknownError,
    CommitWarning,
    DistributedCheckpointError,
    IncompleteCheckpointError,
)
from distcp.filesystem.block_verification import BlockKey
from distcp.filesystem.reader import FileSystemReader
from distcp.filesystem.writer import FileSystemWriter
from distcp.gc_pause import gc_paused
from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import STATE_DICT_TYPE, Metadata
from distcp.plan_cache import PLAN_CACHE, plan_digest
from distcp.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from distcp.save_planner import DefaultSavePlanner
from distcp.stateful import Stateful
from distcp.storage import StorageReader, StorageWriter, WriteResult, wait_future
from distcp.storage_roles import JointlyVerifyingReader, ReleasingWriter
from distcp.telemetry import add_bytes, phase

__all__ = ["CheckpointException", "load", "load_state_dict", "save", "save_state_dict"]

F = TypeVar("F", bound=Callable[..., Any])


def accepts_old_argument_order(storage_name: str) -> Callable[[F], F]:
    """Let ``f(state_dict, storage)`` mean ``f(state_dict, <storage_name>=storage)``
    with a ``FutureWarning``, as torch DCP does for code written before its
    arguments became keyword-only."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 2:
                if storage_name in kwargs:
                    raise TypeError(
                        f"{function.__name__}() got {storage_name} both positionally and by keyword"
                    )
                warnings.warn(
                    f"{function.__name__}(state_dict, {storage_name}) is the old argument "
                    f"order; pass {storage_name}=... by keyword",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[storage_name] = args[1]
                args = args[:1]
            return function(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


@accepts_old_argument_order("storage_writer")
def save(
    state_dict: STATE_DICT_TYPE,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_writer: StorageWriter | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    use_collectives: bool = True,
    timeout: float | datetime.timedelta | None = None,
) -> Metadata:
    """Save ``state_dict`` as a checkpoint; every rank of ``process_group`` calls it.

    Each rank writes its own chunks (replicated items once, shared out across
    ranks); the coordinator commits the metadata once every rank succeeded. If
    any rank fails, nothing is committed, the checkpoint previously at the path
    stays loadable, and every rank raises the same error.

    With ``use_collectives=False`` (DCP's rank-local save) no rank talks to
    another: each plans, writes and commits its own state under its own
    rank-scoped metadata, and loading needs the same world size.

    ``timeout`` (seconds or a timedelta; default ``DISTCP_COLLECTIVE_TIMEOUT``,
    600 s) bounds each wait for the other ranks: a rank that hung or died makes
    every live rank raise :class:`CollectiveTimeoutError` naming it.
    """
    writer = storage_for(storage_writer, checkpoint_id, FileSystemWriter, "storage_writer")
    if not use_collectives:
        return _save_rank_local(state_dict, writer, planner, process_group, no_dist, timeout)
    return _save(
        state_dict, writer, planner, process_group, no_dist, coordinator_rank=0, timeout=timeout
    )


@accepts_old_argument_order("storage_reader")
def load(
    state_dict: STATE_DICT_TYPE,
    *,
    checkpoint_id: str | os.PathLike[str] | None = None,
    storage_reader: StorageReader | None = None,
    planner: LoadPlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    """Load a checkpoint into ``state_dict`` in place; every rank calls it.

    Tensors are filled in place (their layout may differ from the saved one);
    non-tensor values are replaced inside the caller's (nested) dict;
    ``Stateful`` values get ``load_state_dict`` with what was loaded.
    ``timeout`` as in :func:`save`.
    """
    reader = storage_for(storage_reader, checkpoint_id, FileSystemReader, "storage_reader")
    _load(state_dict, reader, planner, process_group, no_dist, coordinator_rank=0, timeout=timeout)


def save_state_dict(
    state_dict: STATE_DICT_TYPE,
    storage_writer: StorageWriter,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: SavePlanner | None = None,
) -> Metadata:
    """The older entry point of :func:`save`, kept for DCP code that uses it."""
    storage_writer.reset()
    return _save(state_dict, storage_writer, planner, process_group, no_dist, coordinator_rank)


def load_state_dict(
    state_dict: STATE_DICT_TYPE,
    storage_reader: StorageReader,
    process_group: dist.ProcessGroup | None = None,
    coordinator_rank: int = 0,
    no_dist: bool = False,
    planner: LoadPlanner | None = None,
) -> None:
    """The older entry point of :func:`load`, kept for DCP code that uses it."""
    storage_reader.reset()
    _load(state_dict, storage_reader, planner, process_group, no_dist, coordinator_rank)


def storage_for(given: Any, checkpoint_id: Any, default: type, name: str) -> Any:
    """The storage a call uses: ``given`` (reset to ``checkpoint_id``), or
    distcp's own storage at ``checkpoint_id``: a local directory, or, for a
    URL (``s3://…``, ``gs://…``, ``memory://…``), the fsspec store of its
    protocol (:mod:`distcp.stores`)."""
    if given is None:
        if checkpoint_id is None:
            raise CheckpointArgumentError(
                f"pass checkpoint_id (a checkpoint directory or URL) or a {name}; neither was given"
            )
        if not isinstance(checkpoint_id, (str, os.PathLike)):
            raise CheckpointArgumentError(
                f"checkpoint_id must be a path or a string, got {type(checkpoint_id).__name__}"
            )
        return default(checkpoint_id)
    given.reset(checkpoint_id)
    return given


def _coordinator(
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    coordinator_rank: int,
    timeout: float | datetime.timedelta | None = None,
) -> Coordinator:
    if not no_dist and not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise CheckpointArgumentError(
                "a process_group was given but torch.distributed is not initialised"
            )
        warnings.warn(
            "torch.distributed is not initialised; running as a single process (pass "
            "no_dist=True to silence this)",
            stacklevel=3,
        )
        no_dist = True
    return Coordinator(
        process_group, no_dist=no_dist, coordinator_rank=coordinator_rank, timeout=timeout
    )


def _save(
    state_dict: STATE_DICT_TYPE,
    writer: StorageWriter,
    planner: SavePlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    coordinator_rank: int,
    timeout: float | datetime.timedelta | None = None,
) -> Metadata:
    ranks = _coordinator(process_group, no_dist, coordinator_rank, timeout)
    planner = planner or DefaultSavePlanner()
    with gc_paused():
        with phase("plan"):
            planned = plan_save(state_dict, writer, planner, ranks)

        def write() -> list[WriteResult]:
            final_plan = planner.finish_plan(planned.central_plan)
            results: list[WriteResult] = wait_future(writer.write_data(final_plan, planner))
            return results

        return commit_save(planned, write)


def set_up_save(
    planner: SavePlanner,
    writer: StorageWriter,
    state_dict: STATE_DICT_TYPE,
    ranks: Coordinator,
    *,
    use_collectives: bool,
) -> None:
    """``set_up_planner`` and ``set_up_storage_writer``, passing the newer
    arguments (``storage_meta``; ``rank``, ``use_collectives``) only to
    implementations that take them, as torch DCP does for older classes."""
    if accepts_parameter(planner.set_up_planner, "storage_meta"):
        planner.set_up_planner(state_dict, writer.storage_meta(), ranks.is_coordinator)
    else:
        planner.set_up_planner(state_dict, ranks.is_coordinator)  # type: ignore[arg-type]
    if accepts_parameter(writer.set_up_storage_writer, "rank"):
        writer.set_up_storage_writer(
            ranks.is_coordinator, rank=ranks.rank, use_collectives=use_collectives
        )
    else:
        writer.set_up_storage_writer(ranks.is_coordinator)


def accepts_parameter(function: Callable[..., Any], name: str) -> bool:
    """Whether ``function`` takes a keyword ``name`` (by name or ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _save_rank_local(
    state_dict: STATE_DICT_TYPE,
    writer: StorageWriter,
    planner: SavePlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    timeout: float | datetime.timedelta | None = None,
) -> Metadata:
    """DCP's ``use_collectives=False``: this rank plans, writes and commits its
    own state alone, as a one-rank save under rank-scoped metadata; the ranks
    meet once at the end (as DCP's barrier), where a failure on any rank
    raises on every rank."""
    ranks = _coordinator(process_group, no_dist, 0, timeout)
    planner = planner or DefaultSavePlanner()
    resolved = _resolve_stateful(state_dict)

    def save_alone() -> Metadata:
        with gc_paused():
            try:
                set_up_save(planner, writer, resolved, ranks, use_collectives=False)
                local = writer.prepare_local_plan(planner.create_local_plan())
                plans, metadata = planner.create_global_plan([local])
                plan = planner.finish_plan(writer.prepare_global_plan(plans)[0])
                results: list[WriteResult] = wait_future(writer.write_data(plan, planner))
                writer.finish(metadata, [results])
            finally:
                release_storage(writer)
            return metadata

    metadata_box: list[Metadata] = []
    ranks.all_gather("saving rank-local checkpoints", lambda: metadata_box.append(save_alone()))
    return metadata_box[0]


@dataclasses.dataclass
class PlannedSave:
    """A save after its collective planning: this rank's plan from the
    coordinator (before ``finish_plan``), and what the commit needs."""

    ranks: Coordinator
    writer: StorageWriter
    central_plan: SavePlan
    metadata: Metadata | None  # the coordinator's; None on other ranks


def plan_save(
    state_dict: STATE_DICT_TYPE, writer: StorageWriter, planner: SavePlanner, ranks: Coordinator
) -> PlannedSave:
    """The save's planning steps, up to each rank holding its plan; a failure
    on any rank raises the same error on every rank."""
    resolved = _resolve_stateful(state_dict)
    metadata_box: list[Metadata] = []

    def local_plan() -> SavePlan:
        set_up_save(planner, writer, resolved, ranks, use_collectives=True)
        return writer.prepare_local_plan(planner.create_local_plan())

    def global_plan(all_plans: list[SavePlan]) -> list[SavePlan]:
        caching = getattr(planner, "enable_plan_caching", False) is True
        key = (type(planner), ranks.world_size, ranks.coordinator_rank)
        digest = plan_digest(all_plans) if caching else b""
        cached = PLAN_CACHE.lookup(key, digest) if caching else None
        if cached is None:
            all_plans, metadata = planner.create_global_plan(all_plans)
            if caching:
                PLAN_CACHE.store(key, digest, all_plans, metadata)
        else:
            all_plans, metadata = cached
            # The plans repeat; this save's storage (its checkpoint_id) does not.
            metadata = dataclasses.replace(
                metadata, storage_meta=getattr(planner, "storage_meta", None), storage_data=None
            )
        metadata_box.append(metadata)
        return writer.prepare_global_plan(all_plans)

    try:
        central_plan = ranks.reduce_scatter("planning the save", local_plan, global_plan)
    except BaseException:
        release_storage(writer)
        raise
    return PlannedSave(ranks, writer, central_plan, metadata_box[0] if metadata_box else None)


def release_storage(writer: StorageWriter) -> None:
    """A save has ended, committed or not: a writer that holds something for
    the save (distcp's: the directory's lock) lets it go."""
    if isinstance(writer, ReleasingWriter):
        writer.release()


def commit_save(planned: PlannedSave, write: Callable[[], list[WriteResult]]) -> Metadata:
    """Every rank runs ``write``; once all succeeded the coordinator commits.
    A failure on any rank commits nothing and raises the same error everywhere.

    The outcome a caller sees matches the path (docs/format.md §7): a return
    means the new checkpoint is there, :class:`CommitOutcomeUnknownError`
    (a rank that lost the coordinator while it committed) that either may
    be, any other error that the previous one is. A coordinator that
    committed but could not tell the others returns, with a CommitWarning."""
    committed = False

    def commit(results: list[list[WriteResult]]) -> Metadata:
        nonlocal committed
        assert planned.metadata is not None  # commit runs on the coordinator
        with phase("commit"):
            planned.writer.finish(planned.metadata, results)
        committed = True
        return planned.metadata

    def timed_write() -> list[WriteResult]:
        with phase("write"):
            results = write()
        add_bytes(sum(result.size_in_bytes for result in results))
        return results

    try:
        return planned.ranks.all_reduce("writing the checkpoint", timed_write, commit)
    except DistributedCheckpointError as error:
        if committed:
            assert planned.metadata is not None
            warnings.warn(
                f"distcp: committed the checkpoint, but telling the other ranks failed: {error}",
                CommitWarning,
                stacklevel=2,
            )
            return planned.metadata
        if error.while_delivering and not planned.ranks.is_coordinator:
            save_id = getattr(planned.central_plan.storage_data, "save_id", None)
            raise CommitOutcomeUnknownError(error.step, error.causes, save_id) from error
        raise
    finally:
        release_storage(planned.writer)


def _load(
    state_dict: STATE_DICT_TYPE,
    reader: StorageReader,
    planner: LoadPlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    coordinator_rank: int,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    with gc_paused():
        _load_paused(state_dict, reader, planner, process_group, no_dist, coordinator_rank, timeout)


def _load_paused(
    state_dict: STATE_DICT_TYPE,
    reader: StorageReader,
    planner: LoadPlanner | None,
    process_group: dist.ProcessGroup | None,
    no_dist: bool,
    coordinator_rank: int,
    timeout: float | datetime.timedelta | None = None,
) -> None:
    ranks = _coordinator(process_group, no_dist, coordinator_rank, timeout)
    planner = planner or DefaultLoadPlanner()
    # Sorted, as torch DCP does: a Stateful's state_dict() may run collectives.
    resolved = _resolve_stateful({key: state_dict[key] for key in sorted(state_dict)})

    def local_plan() -> LoadPlan:
        metadata, use_collectives = read_metadata(reader, ranks.rank)
        planner.set_up_planner(resolved, metadata, ranks.is_coordinator)
        if isinstance(reader, JointlyVerifyingReader):  # split blocks verified jointly
            reader.set_up_storage_reader(
                metadata,
                ranks.is_coordinator,
                rank=ranks.rank,
                use_collectives=use_collectives,
                joint_verification=True,
            )
        elif accepts_parameter(reader.set_up_storage_reader, "rank"):
            reader.set_up_storage_reader(
                metadata, ranks.is_coordinator, rank=ranks.rank, use_collectives=use_collectives
            )
        else:
            reader.set_up_storage_reader(metadata, ranks.is_coordinator)
        return reader.prepare_local_plan(planner.create_local_plan())

    def global_plan(all_plans: list[LoadPlan]) -> list[LoadPlan]:
        return reader.prepare_global_plan(planner.create_global_plan(all_plans))

    with phase("plan"):
        central_plan = ranks.reduce_scatter("planning the load", local_plan, global_plan)

    def read() -> dict[BlockKey, int]:
        with phase("read"):
            final_plan = planner.finish_plan(central_plan)
            wait_future(reader.read_data(final_plan, planner))
        report = getattr(reader, "report", None)
        add_bytes(int(getattr(report, "bytes_fetched", 0) or getattr(report, "bytes_read", 0)))
        if isinstance(reader, JointlyVerifyingReader):
            return dict(reader.masked_checksums())
        return {}

    masked = ranks.all_gather("reading the checkpoint", read)
    if isinstance(reader, JointlyVerifyingReader):
        with phase("verify"):
            reader.verify_split_blocks(masked)  # same outcome on every rank: all see all
    for key in sorted(state_dict):  # the same order on every rank, whatever each dict's
        value = state_dict[key]
        if _is_stateful(value):
            value.load_state_dict(resolved[key])
        else:  # a top-level value the planner replaced in the shallow copy
            state_dict[key] = resolved[key]


def read_metadata(reader: StorageReader, rank: int) -> tuple[Metadata, bool]:
    """The checkpoint's metadata, and whether it is one global metadata (True)
    or this rank's own from a ``use_collectives=False`` save (False)."""
    try:
        return reader.read_metadata(), True
    except IncompleteCheckpointError:
        if not accepts_parameter(reader.read_metadata, "rank"):
            raise
        try:
            return reader.read_metadata(rank=rank), False
        except (IncompleteCheckpointError, CheckpointNotFoundError):
            pass
        raise


def _is_stateful(value: Any) -> bool:
    """``isinstance(value, Stateful)``, answered without the (slow) runtime
    Protocol check for the plain values most state dicts are made of."""
    if isinstance(value, (torch.Tensor, dict, list, tuple, str, bytes, int, float, type)):
        return False
    return isinstance(value, Stateful)


def _resolve_stateful(state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
    """A shallow copy with each top-level Stateful replaced by its state_dict()."""
    return {
        key: value.state_dict() if _is_stateful(value) else value
        for key, value in state_dict.items()
    }
