"""The coordinator: runs each collective step of save and load over a
torch.distributed process group (or none), and turns a failure on any rank
into the same error on every rank.

Coordination uses object collectives over a CPU (gloo) group, so exchanging
plans never allocates GPU memory even when the default group is NCCL.
"""

from __future__ import annotations

import contextlib
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import torch.distributed as dist

from distcp.errors import CheckpointError, DistributedCheckpointError, RemoteError

__all__ = ["Coordinator", "cpu_group", "sendable_error"]

T = TypeVar("T")
R = TypeVar("R")

_cpu_groups: WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup] = WeakKeyDictionary()


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
    ) -> None:
        self.distributed = not no_dist and dist.is_available() and dist.is_initialized()
        if self.distributed:
            group = process_group or dist.group.WORLD
            assert group is not None
            self.group = cpu_group(group)
            self.rank = dist.get_rank(group)
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
        gathered = self._gather(step, mine)
        outcome: Any = None
        if self.is_coordinator:
            assert gathered is not None
            outcome = self._failure(step, gathered)
            if outcome is None:
                outcome = _attempt(lambda: central(gathered))
                if isinstance(outcome, _Failed):
                    outcome = _Failed(self._error(step, {self.rank: outcome.error}))
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

    def _scatter(self, step: str, values: list[Any] | None) -> Any:
        output: list[Any] = [None]
        with self._collective(step):
            dist.scatter_object_list(
                output, values, group=self.group, group_src=self.coordinator_rank
            )
        return output[0]

    def _broadcast(self, step: str, value: Any) -> Any:
        box = [value]
        with self._collective(step):
            dist.broadcast_object_list(box, group=self.group, group_src=self.coordinator_rank)
        return box[0]

    @contextlib.contextmanager
    def _collective(self, step: str) -> Iterator[None]:
        """A collective that fails (a rank died, hung past the timeout, or the
        network broke) raises a :class:`DistributedCheckpointError` too, with
        this rank's view of the cause."""
        try:
            yield
        except Exception as error:
            raise DistributedCheckpointError(
                f"{step} (exchanging with the other ranks: one may have died or timed out)",
                {self.rank: sendable_error(error)},
            ) from error


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
