"""``CheckpointManager``: the loop every training job writes around
``save``/``load``, once, with the bugs users report taken out.

- Steps live in ``root/step-<N>`` (a local path or any fsspec URL). A step is
  committed when its metadata is committed, nothing else; ``load`` and
  ``latest_step`` only ever choose committed steps.
- ``save(step, state)`` saves every ``interval`` steps (or when forced), on
  every rank; with ``async_mode`` ``"thread"`` or ``"process"`` through
  :func:`distcp.async_save`, at most one save in flight: the next ``save``
  waits for it (``when_busy="wait"``, the time waited is reported) or skips
  (``"skip"``; every rank makes the same choice). A background save's error
  surfaces at the next ``save``, ``wait`` or ``close`` on every rank.
- **Retention** (``keep_latest_k``, ``keep_every_n_steps``) runs after a
  commit, in a background thread of the coordinator: it never deletes the
  newest committed step, nor a step being written, nor an incomplete step
  newer than the newest committed one (it may be being written); it removes
  incomplete steps older than that (crashed saves). A step is removed
  metadata first, so a removal cut short leaves an incomplete step, never a
  committed one with data missing. Failures are logged, never raised.
- ``trainable_only=True`` saves only the parameters that require grad of each
  top-level ``nn.Module`` in the state (buffers, optimizer and the rest in
  full), recording ``base_checkpoint``; ``load`` then fills the frozen ones
  from the base.
- ``export_weights(state, dtype=torch.bfloat16)`` writes the modules' weights
  alone to ``root/weights-<N>``, cast while written.
- **Telemetry**: each save and load's phases (plan, write, commit; plan, read,
  verify), bytes and, for async saves, the time training was blocked, per
  rank: to the ``distcp`` logger, to ``on_event`` callbacks, and (by the
  coordinator) as JSON lines to ``root/checkpoint-log.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distcp.api import load as distcp_load
from distcp.api import save as distcp_save
from distcp.async_save import AsyncCheckpointerType, async_save
from distcp.errors import CheckpointArgumentError
from distcp.filesystem.reader import FileSystemReader
from distcp.filesystem.writer import FileSystemWriter
from distcp.manager.steps import StepDirectories
from distcp.manager.weights import CastingSavePlanner, FrozenOnly, TrainableOnly
from distcp.telemetry import PhaseRecord, recording

__all__ = ["CheckpointManager"]

log = logging.getLogger("distcp")

#: The key under which the manager records what it saved (a small value).
MANAGER_KEY = "distcp_manager"
LOG_FILE = "checkpoint-log.jsonl"


class CheckpointManager:
    """See the module docstring. Every rank constructs it with the same
    arguments and calls ``save``/``load``/``wait``/``close`` in the same order."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        interval: int = 1,
        keep_latest_k: int | None = None,
        keep_every_n_steps: int | None = None,
        async_mode: str | None = None,
        when_busy: str = "wait",
        trainable_only: bool = False,
        base_checkpoint: str | os.PathLike[str] | None = None,
        process_group: dist.ProcessGroup | None = None,
        storage_options: dict[str, Any] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        if interval < 1:
            raise CheckpointArgumentError(f"interval must be at least 1, got {interval}")
        if keep_latest_k is not None and keep_latest_k < 1:
            raise CheckpointArgumentError(f"keep_latest_k must be at least 1, got {keep_latest_k}")
        if keep_every_n_steps is not None and keep_every_n_steps < 1:
            raise CheckpointArgumentError("keep_every_n_steps must be at least 1")
        if async_mode not in (None, "thread", "process"):
            raise CheckpointArgumentError(
                f"async_mode must be None, 'thread' or 'process', not {async_mode!r}"
            )
        if when_busy not in ("wait", "skip"):
            raise CheckpointArgumentError(f"when_busy must be 'wait' or 'skip', not {when_busy!r}")
        if trainable_only and base_checkpoint is None:
            raise CheckpointArgumentError(
                "trainable_only=True needs base_checkpoint: where the frozen parameters come from"
            )
        self.steps = StepDirectories(root, storage_options)
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        self.keep_every_n_steps = keep_every_n_steps
        self.async_mode = async_mode
        self.when_busy = when_busy
        self.trainable_only = trainable_only
        self.base_checkpoint = None if base_checkpoint is None else os.fspath(base_checkpoint)
        self.process_group = process_group
        self.storage_options = storage_options
        self.on_event = on_event
        self.timeout = timeout
        self._distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(process_group) if self._distributed else 0
        self.is_coordinator = self.rank == 0
        self._in_flight: tuple[int, Future[Any], float, float, PhaseRecord] | None = None
        self._writing: set[int] = set()
        self._lock = threading.Lock()
        self._purger = ThreadPoolExecutor(1, thread_name_prefix="distcp-retention")
        self._closed = False
        if self.is_coordinator:
            self.steps.prepare()
        self._barrier()

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """The committed steps, ascending (as this rank sees the root now)."""
        return sorted(step for step, committed in self.steps.steps().items() if committed)

    def latest_step(self) -> int | None:
        """The newest committed step, or None. A collective: every rank calls
        it and gets the coordinator's answer."""
        steps = self.all_steps() if self.is_coordinator else []
        latest = steps[-1] if steps else None
        chosen: int | None = self._broadcast(latest)
        return chosen

    # ------------------------------------------------------------------ saving

    def save(
        self,
        step: int,
        state: dict[str, Any],
        force: bool = False,
    ) -> bool:
        """Save ``state`` as step ``step`` if ``step`` is a multiple of the
        interval (or ``force``); returns whether a save started (async) or
        committed (sync). A call that saves first raises a previous
        background save's error (every rank alike); one off the interval
        returns False at once, without a collective."""
        self._check_open()
        if not force and step % self.interval:
            return False
        waited = 0.0
        if self.async_mode is not None:
            busy = self._in_flight is not None and not self._in_flight[1].done()
            if self.when_busy == "skip" and self._any_rank(busy):
                log.info(
                    "distcp: skipping the save of step %d: the previous one is in flight", step
                )
                self._emit({"event": "save_skipped", "step": step})
                return False
            began = time.perf_counter()
            self._finish_in_flight()
            waited = time.perf_counter() - began
        location = self.steps.step_location(step)
        to_save = self._state_to_save(step, state)
        writer = FileSystemWriter(location, storage_options=self.storage_options)
        with self._lock:
            self._writing.add(step)
        if self.async_mode is None:
            try:
                with recording("save") as record:
                    began = time.perf_counter()
                    distcp_save(
                        to_save,
                        storage_writer=writer,
                        process_group=self.process_group,
                        no_dist=not self._distributed,
                        timeout=self.timeout,
                    )
                    seconds = time.perf_counter() - began
            finally:
                with self._lock:
                    self._writing.discard(step)
            self._report_save(step, record.seconds, record.bytes, seconds, seconds, waited)
            self._after_commit()
            return True
        kind = AsyncCheckpointerType(self.async_mode)
        began = time.perf_counter()
        try:
            with recording("save") as record:  # the background phases land here too
                future = async_save(
                    to_save,
                    storage_writer=writer,
                    process_group=self.process_group,
                    no_dist=not self._distributed,
                    async_checkpointer_type=kind,
                    timeout=self.timeout,
                )
        except BaseException:
            with self._lock:
                self._writing.discard(step)
            raise
        blocked = time.perf_counter() - began
        assert isinstance(future, Future)
        self._in_flight = (step, future, began, blocked, record)
        self._emit(
            {"event": "save_started", "step": step, "blocking_s": blocked, "waited_s": waited}
        )
        return True

    def export_weights(
        self, step: int, state: dict[str, Any], dtype: torch.dtype = torch.bfloat16
    ) -> str:
        """Write the weights of the top-level modules in ``state`` alone to
        ``root/weights-<step>``, floating-point tensors cast to ``dtype`` as
        they are written (one tensor's copy at a time); returns the location.
        Not a step: never chosen by ``load``, never removed by retention."""
        self._check_open()
        self._finish_in_flight()
        modules = {key: value for key, value in state.items() if isinstance(value, nn.Module)}
        if not modules:
            raise CheckpointArgumentError("export_weights: the state holds no nn.Module")
        location = self.steps.location(f"weights-{step}")
        distcp_save(
            {key: module.state_dict() for key, module in modules.items()},
            storage_writer=FileSystemWriter(location, storage_options=self.storage_options),
            planner=CastingSavePlanner(dtype),
            process_group=self.process_group,
            no_dist=not self._distributed,
            timeout=self.timeout,
        )
        self._emit({"event": "export", "step": step, "location": location, "dtype": str(dtype)})
        return location

    # ------------------------------------------------------------------ loading

    def load(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Load step ``step`` (None: the newest committed one) into ``state``
        in place; returns the step loaded, or None when there is none."""
        self._check_open()
        self._finish_in_flight()
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        location = self.steps.step_location(step)
        to_load: dict[str, Any] = {}
        recorded = self._manager_record(location)
        partial = bool(recorded.get("trainable_only"))
        for key, value in state.items():
            to_load[key] = (
                TrainableOnly(value) if partial and isinstance(value, nn.Module) else value
            )
        reader = FileSystemReader(location, storage_options=self.storage_options)
        with recording("load") as record:
            began = time.perf_counter()
            distcp_load(
                to_load,
                storage_reader=reader,
                process_group=self.process_group,
                no_dist=not self._distributed,
                timeout=self.timeout,
            )
            seconds = time.perf_counter() - began
        for key, value in to_load.items():  # top-level plain values were replaced, not filled
            if not isinstance(value, TrainableOnly):
                state[key] = value
        if partial:
            self._load_frozen(state, str(recorded.get("base_checkpoint")))
        report = reader.report
        self._publish(
            {
                "event": "load",
                "step": step,
                "seconds": seconds,
                "bytes": record.bytes,
                "bytes_needed": report.bytes_needed,
                "bytes_read": report.bytes_read,
                "phases": record.seconds,
            }
        )
        return step

    def _manager_record(self, location: str) -> dict[str, Any]:
        """What the manager recorded in the checkpoint at ``location`` (its
        fields are None in a checkpoint that ``distcp.save`` wrote)."""
        holder: dict[str, Any] = {
            MANAGER_KEY: {"step": None, "trainable_only": None, "base_checkpoint": None}
        }
        from distcp.load_planner import DefaultLoadPlanner

        distcp_load(
            holder,
            storage_reader=FileSystemReader(location, storage_options=self.storage_options),
            planner=DefaultLoadPlanner(allow_partial_load=True),
            process_group=self.process_group,
            no_dist=not self._distributed,
            timeout=self.timeout,
        )
        record = holder[MANAGER_KEY]
        return record if isinstance(record, dict) else {}

    def _load_frozen(self, state: dict[str, Any], base: str) -> None:
        frozen = {k: FrozenOnly(v) for k, v in state.items() if isinstance(v, nn.Module)}
        if frozen:
            distcp_load(
                frozen,
                storage_reader=FileSystemReader(base, storage_options=self.storage_options),
                process_group=self.process_group,
                no_dist=not self._distributed,
                timeout=self.timeout,
            )

    # ------------------------------------------------------------------ lifecycle

    def wait(self) -> None:
        """Wait for the save in flight, if any; raises its error (on every rank)."""
        self._finish_in_flight()

    def close(self) -> None:
        """Wait for the save in flight and for retention; idempotent. A
        collective: every rank calls it."""
        self._close(synchronize=True)

    def _close(self, *, synchronize: bool) -> None:
        if self._closed:
            return
        try:
            self._finish_in_flight()
        finally:
            self._closed = True
            self._purger.shutdown(wait=True)
        if synchronize:
            self._barrier()  # every rank sees the root as retention left it

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if error is None:
            self.close()
            return
        try:  # leaving on an error: do not mask it, nor wait for ranks that may not come
            self._close(synchronize=False)
        except Exception as close_error:
            log.warning("distcp: closing the checkpoint manager failed: %s", close_error)

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointArgumentError("this CheckpointManager is closed")

    def _state_to_save(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        if MANAGER_KEY in state:
            raise CheckpointArgumentError(f"the state may not use the key {MANAGER_KEY!r}")
        out: dict[str, Any] = {}
        for key, value in state.items():
            keep_all = not self.trainable_only or not isinstance(value, nn.Module)
            out[key] = value if keep_all else TrainableOnly(value)
        out[MANAGER_KEY] = {
            "step": step,
            "trainable_only": self.trainable_only,
            "base_checkpoint": self.base_checkpoint,
        }
        return out

    def _finish_in_flight(self) -> None:
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        step, future, began, blocked, record = in_flight
        try:
            future.result()
        finally:
            with self._lock:
                self._writing.discard(step)
        total = time.perf_counter() - began  # until this rank saw the commit
        self._report_save(step, dict(record.seconds), record.bytes, total, blocked, 0.0)
        self._after_commit()

    def _report_save(
        self,
        step: int,
        phases: dict[str, float],
        nbytes: int,
        total: float,
        blocked: float,
        waited: float,
    ) -> None:
        event = {
            "event": "save",
            "step": step,
            "mode": self.async_mode or "sync",
            "seconds": total,
            "blocking_s": blocked,
            "waited_for_previous_s": waited,
            "phases": phases,
            "bytes": nbytes,
        }
        self._publish(event)

    def _publish(self, event: dict[str, Any]) -> None:
        """Log this rank's event, hand it to the callback, and have the
        coordinator append every rank's to the log file."""
        event = {"rank": self.rank, **event}
        self._emit(event)
        events = self._gather(event)
        if self.is_coordinator:
            line = {
                "time": datetime.datetime.now().astimezone().isoformat(timespec="milliseconds"),
                "event": event["event"],
                "step": event.get("step"),
                "ranks": events,
            }
            try:
                self.steps.append_line(LOG_FILE, json.dumps(line))
            except OSError as error:
                log.warning("distcp: appending to %s failed: %s", LOG_FILE, error)

    def _emit(self, event: dict[str, Any]) -> None:
        log.info("distcp checkpoint: %s", json.dumps(event))
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as error:
                log.warning("distcp: the on_event callback raised %s", error)

    def _after_commit(self) -> None:
        if self.is_coordinator and (self.keep_latest_k is not None or self.keep_every_n_steps):
            self._purger.submit(self._purge)

    def _purge(self) -> None:
        """Retention (see the module docstring); runs on the coordinator's
        background thread."""
        try:
            found = self.steps.steps()
            committed = sorted(step for step, done in found.items() if done)
            if not committed:
                return
            newest = committed[-1]
            keep = set(committed[-self.keep_latest_k :]) if self.keep_latest_k else set(committed)
            if self.keep_every_n_steps:
                keep |= {step for step in committed if step % self.keep_every_n_steps == 0}
            keep.add(newest)
            with self._lock:
                writing = set(self._writing)
            doomed = [
                step
                for step, done in sorted(found.items())
                if step not in keep and step not in writing and (done or step < newest)
            ]
            for step in doomed:
                try:
                    self.steps.remove(step)
                    log.info("distcp: retention removed step %d", step)
                except OSError as error:
                    log.warning("distcp: retention could not remove step %d: %s", step, error)
        except Exception as error:
            log.warning("distcp: retention failed: %s", error)

    # collectives (no-ops without a process group)

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self.process_group)

    def _broadcast(self, value: Any) -> Any:
        if not self._distributed:
            return value
        box = [value]
        dist.broadcast_object_list(
            box,
            src=dist.get_global_rank(self.process_group, 0) if self.process_group else 0,
            group=self.process_group,
        )
        return box[0]

    def _any_rank(self, flag: bool) -> bool:
        if not self._distributed:
            return flag
        flags: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(flags, flag, group=self.process_group)
        return any(flags)

    def _gather(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        if not self._distributed:
            return [event]
        events: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(events, event, group=self.process_group)
        return events
