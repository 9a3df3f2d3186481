"""The coordinator: runs each collective step of save and load over a
torch.distributed process group (or none), and turns a failure on any rank
into the same error on every rank.

Coordination uses object collectives over a CPU (gloo) group, so exchanging
plans never allocates GPU memory even when the default group is NCCL.

Every step is bounded in time. The group is distcp's own gloo group over the
same ranks, created with distcp's timeout (``COLLECTIVE_TIMEOUT_S``, or
``timeout=`` per call), and before each exchange the ranks meet in a
``monitored_barrier``: a rank that hung or died makes every live rank raise
:class:`CollectiveTimeoutError` within the timeout instead of waiting for the
process group's (30 minutes by default). Rank 0 of the group, which the
barrier reports to, names the ranks that did not arrive; the others name
rank 0, which did not confirm that everyone had.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
import re
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import torch.distributed as dist

from distcp import knobs
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointError,
    CollectiveTimeoutError,
    DistributedCheckpointError,
    RemoteError,
)

__all__ = ["Coordinator", "cpu_group", "resolve_timeout", "sendable_error", "timed_group"]

T = TypeVar("T")
R = TypeVar("R")

_cpu_groups: WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup] = WeakKeyDictionary()
_timed_groups: WeakKeyDictionary[dist.ProcessGroup, dict[float, dist.ProcessGroup]] = (
    WeakKeyDictionary()
)


class _Failed:
    """A rank's failure, as sent to the other ranks."""

    def __init__(self, error: BaseException) -> None:
        self.error = sendable_error(error)


class Coordinator:
    """One save or load's view of the ranks taking part.

    With no process group (``no_dist=True``, or torch.distributed not
    initialised) it runs every step locally, as rank 0 of 1.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        *,
        no_dist: bool = False,
        coordinator_rank: int = 0,
        timeout: float | datetime.timedelta | None = None,
    ) -> None:
        self.distributed = not no_dist and dist.is_available() and dist.is_initialized()
        self.timeout = resolve_timeout(timeout)
        if self.distributed:
            group = process_group or dist.group.WORLD
            assert group is not None
            self.rank = dist.get_rank(group)
            try:
                self.group = timed_group(group, self.timeout)
            except Exception as error:  # a rank died while the group was being made
                raise DistributedCheckpointError(
                    "setting up distcp's process group (a rank may have died)",
                    {self.rank: sendable_error(error)},
                ) from error
            self.world_size = dist.get_world_size(group)
        else:
            self.rank, self.world_size = 0, 1
        if not 0 <= coordinator_rank < self.world_size:
            raise ValueError(
                f"coordinator_rank {coordinator_rank} is not in a group of {self.world_size}"
            )
        self.coordinator_rank = coordinator_rank

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator_rank

    def reduce_scatter(
        self,
        step: str,
        local: Callable[[], T],
        central: Callable[[list[T]], list[R]],
    ) -> R:
        """Every rank runs ``local``; the coordinator runs ``central`` on all the
        results and each rank gets its own part back. A failure anywhere makes
        every rank raise the same :class:`DistributedCheckpointError`."""
        mine = _attempt(local)
        if not self.distributed:
            return self._run_locally(step, mine, central)[0]  # type: ignore[no-any-return]
        self._arrive(step)
        gathered = self._gather(step, mine)
        outgoing: list[Any] | None = None
        if self.is_coordinator:
            assert gathered is not None
            failure = self._failure(step, gathered)
            if failure is None:
                results = _attempt(lambda: central(gathered))
                if isinstance(results, _Failed):
                    failure = _Failed(self._error(step, {self.rank: results.error}))
                else:
                    outgoing = list(results)
            outgoing = outgoing if failure is None else [failure] * self.world_size
        self._arrive(step, delivering=True)
        received = self._scatter(step, outgoing)
        if isinstance(received, _Failed):
            raise received.error
        return received  # type: ignore[no-any-return]

    def all_reduce(
        self,
        step: str,
        local: Callable[[], T],
        central: Callable[[list[T]], R],
    ) -> R:
        """Every rank runs ``local``; the coordinator runs ``central`` on all the
        results and every rank gets its result. Failures as in ``reduce_scatter``."""
        mine = _attempt(local)
        if not self.distributed:
            return self._run_locally(step, mine, central)  # type: ignore[no-any-return]
        self._arrive(step)
        gathered = self._gather(step, mine)
        outcome: Any = None
        if self.is_coordinator:
            assert gathered is not None
            outcome = self._failure(step, gathered)
            if outcome is None:
                outcome = _attempt(lambda: central(gathered))
                if isinstance(outcome, _Failed):
                    outcome = _Failed(self._error(step, {self.rank: outcome.error}))
        self._arrive(step, delivering=True)
        received = self._broadcast(step, outcome)
        if isinstance(received, _Failed):
            raise received.error
        return received  # type: ignore[no-any-return]

    def all_gather(self, step: str, local: Callable[[], T]) -> list[T]:
        """Every rank runs ``local`` and gets everyone's results."""
        return self.all_reduce(step, local, lambda results: results)

    def _run_locally(self, step: str, mine: Any, central: Callable[[list[Any]], Any]) -> Any:
        """Without a process group: the same steps and the same errors, on one rank."""
        failure = self._failure(step, [mine])
        if failure is None:
            outcome = _attempt(lambda: central([mine]))
            if not isinstance(outcome, _Failed):
                return outcome
            failure = _Failed(self._error(step, {self.rank: outcome.error}))
        raise failure.error

    def _failure(self, step: str, results: list[Any]) -> _Failed | None:
        failures = {rank: r.error for rank, r in enumerate(results) if isinstance(r, _Failed)}
        return _Failed(self._error(step, failures)) if failures else None

    def _error(self, step: str, failures: dict[int, BaseException]) -> BaseException:
        if not self.distributed:
            (error,) = failures.values()
            if isinstance(error, CheckpointError):
                return error
            wrapped = DistributedCheckpointError(step, failures)
            wrapped.__cause__ = error  # keep the original traceback in one process
            return wrapped
        return DistributedCheckpointError(step, failures)

    def _gather(self, step: str, value: Any) -> list[Any] | None:
        output = [None] * self.world_size if self.is_coordinator else None
        with self._collective(step):
            dist.gather_object(value, output, group=self.group, group_dst=self.coordinator_rank)
        return output

    def _arrive(self, step: str, *, delivering: bool = False) -> None:
        """Wait, at most the timeout, until every rank has reached this point
        of ``step``; else raise :class:`CollectiveTimeoutError` naming the
        ranks that did not (on group rank 0) or rank 0 (on the others)."""
        try:
            dist.monitored_barrier(
                group=self.group,
                timeout=datetime.timedelta(seconds=self.timeout),
                wait_all_ranks=True,
            )
        except Exception as error:
            _forget(self.group)  # broken now: the next save or load makes a new one
            missing = _missing_ranks(str(error)) if self.rank == 0 else None
            if missing:
                who = f"rank(s) {', '.join(map(str, missing))} did not arrive"
            else:
                missing = [0]
                who = (
                    "rank 0 did not confirm that every rank arrived (rank 0, or a rank it "
                    "waited for, died or hung; rank 0's error names which)"
                )
            failure = CollectiveTimeoutError(
                f"{step}: {who} within {self.timeout:g} s (distcp's collective timeout: "
                "timeout= of save/load, or DISTCP_COLLECTIVE_TIMEOUT; a rank that died "
                "is reported at once)",
                {self.rank: sendable_error(error)},
                missing,
            )
            failure.while_delivering = delivering
            raise failure from error

    def _scatter(self, step: str, values: list[Any] | None) -> Any:
        output: list[Any] = [None]
        with self._collective(step, delivering=True):
            dist.scatter_object_list(
                output, values, group=self.group, group_src=self.coordinator_rank
            )
        return output[0]

    def _broadcast(self, step: str, value: Any) -> Any:
        box = [value]
        with self._collective(step, delivering=True):
            dist.broadcast_object_list(box, group=self.group, group_src=self.coordinator_rank)
        return box[0]

    @contextlib.contextmanager
    def _collective(self, step: str, *, delivering: bool = False) -> Iterator[None]:
        """A collective that fails (a rank died, hung past the timeout, or the
        network broke) raises a :class:`DistributedCheckpointError` too, with
        this rank's view of the cause; ``delivering``: the coordinator's
        outcome was being sent (see ``DistributedCheckpointError.while_delivering``)."""
        try:
            yield
        except Exception as error:
            _forget(self.group)
            failure = DistributedCheckpointError(
                f"{step} (exchanging with the other ranks: one may have died or timed out)",
                {self.rank: sendable_error(error)},
            )
            failure.while_delivering = delivering
            raise failure from error


def _attempt(function: Callable[[], T]) -> T | _Failed:
    try:
        return function()
    except Exception as error:
        return _Failed(error)


def sendable_error(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a :class:`RemoteError`
    that keeps its type name, message and traceback."""
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:
        pass
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return RemoteError(type(error).__qualname__, str(error), trace)


def resolve_timeout(timeout: float | datetime.timedelta | None) -> float:
    """Seconds: ``timeout`` given per call, else the knob's default."""
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    seconds = knobs.COLLECTIVE_TIMEOUT_S if timeout is None else float(timeout)
    if not seconds > 0:
        raise CheckpointArgumentError(
            f"timeout must be a positive number of seconds, got {timeout!r}"
        )
    return seconds


def _missing_ranks(message: str) -> list[int]:
    """The ranks gloo's monitored barrier reports as late ("Ranks 1, 3 failed
    to pass monitoredBarrier"); [] when the message has no such list."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", message)
    return [int(rank) for rank in re.findall(r"\d+", found.group(1))] if found else []


def timed_group(group: dist.ProcessGroup, timeout: float) -> dist.ProcessGroup:
    """distcp's gloo group over ``group``'s ranks whose operations time out
    after ``timeout`` seconds; created once per group and timeout (every
    rank of ``group`` creates it at the same save or load)."""
    by_timeout = _timed_groups.setdefault(group, {})
    cached = by_timeout.get(timeout)
    if cached is None:
        cached = dist.new_group(
            ranks=dist.get_process_group_ranks(group),
            backend="gloo",
            timeout=datetime.timedelta(seconds=timeout),
            use_local_synchronization=True,
        )
        by_timeout[timeout] = cached
    return cached


def _forget(timed: dist.ProcessGroup) -> None:
    """Drop ``timed`` from the cache after a failed collective left it unusable."""
    for by_timeout in list(_timed_groups.values()):
        for seconds, cached in list(by_timeout.items()):
            if cached is timed:
                del by_timeout[seconds]


def cpu_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A group over the same ranks that can run object collectives on CPU."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend:
        return group
    cached = _cpu_groups.get(group)
    if cached is None:
        ranks = dist.get_process_group_ranks(group)
        cached = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
        _cpu_groups[group] = cached
    return cached
