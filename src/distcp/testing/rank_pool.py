"""Run functions on N real processes joined over gloo: for tests and benchmarks
of checkpointing code (distcp's own suite and ``bench/`` use it).

A :class:`RankPool` starts ``world_size`` processes once (``spawn``), each
joined to one gloo process group, then runs functions on all of them on
request: ``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every
rank and returns the results in rank order. Reusing the processes (and their
group) keeps a multi-rank suite fast on a small machine; process start-up and
group set-up stay out of anything timed. ``fn`` must be a module-level function
so the workers can import it.

If any rank raises, :meth:`RankPool.run` raises :class:`RankFailure` with every
failing rank's traceback (once one rank failed, the others get a short grace
period: they may be waiting for it in a collective). A rank that does not
answer in time marks the pool ``broken`` and it is closed; start a new one.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["RankFailure", "RankPool", "free_port"]

#: Seconds the other ranks get to answer once one rank has failed.
_GRACE_AFTER_FAILURE_S = 10.0


class RankFailure(AssertionError):
    """A function raised, or did not answer, on one or more ranks; the message
    holds each failing rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, collective_timeout_s: float, tasks: Any, results: Any
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )
    while (task := tasks.get()) is not None:
        function, args = task
        try:
            results.put((rank, True, function(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` gloo ranks in their own processes, reused across runs.

    Args:
        world_size: the number of ranks.
        collective_timeout_s: the process group's timeout for each collective.
        run_timeout_s: how long :meth:`run` waits for the ranks unless told otherwise.
    """

    def __init__(
        self,
        world_size: int,
        *,
        collective_timeout_s: float = 60.0,
        run_timeout_s: float = 180.0,
    ) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.run_timeout_s = run_timeout_s
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        port = free_port()
        self.processes = [
            context.Process(
                target=_worker,
                args=(rank, world_size, port, collective_timeout_s, self.tasks[rank], self.results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()
        self.broken = False

    def run(
        self, function: Callable[..., Any], *args: Any, timeout_s: float | None = None
    ) -> list[Any]:
        """``function(rank, world_size, *args)`` on every rank; the results in
        rank order, or :class:`RankFailure`."""
        if self.broken:
            raise RuntimeError("this rank pool broke earlier (a rank did not answer); start anew")
        for task_queue in self.tasks:
            task_queue.put((function, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        wait_s = self.run_timeout_s if timeout_s is None else timeout_s
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self.results.get(timeout=wait_s)
                outcomes[rank] = (ok, value)
                if not ok:
                    wait_s = min(wait_s, _GRACE_AFTER_FAILURE_S)
        except queue.Empty:
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            outcomes.update({rank: (False, f"(no answer within {wait_s}s)") for rank in missing})
            self.broken = True
            self.close()
        failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failed:
            details = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failed.items()))
            raise RankFailure(f"{function.__name__} failed on ranks {sorted(failed)}:\n{details}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (each leaves its group first), killing any that hang."""
        for task_queue in self.tasks:
            with contextlib.suppress(ValueError, OSError):
                task_queue.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
