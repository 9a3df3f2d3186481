"""Run ordinary test functions on N real processes over gloo.

A :class:`RankPool` starts ``world_size`` worker processes once, each joined
to one gloo process group, and runs functions on all of them on request:
``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank
and returns the per-rank results in rank order. Reusing the processes (and
their process group) across tests keeps a multi-rank suite fast on a small
machine. ``fn`` must be a module-level function so the workers can import it.
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


class RankFailure(AssertionError):
    """A function raised on one or more ranks; carries their tracebacks."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, tasks: Any, results: Any
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
        timeout=timedelta(seconds=timeout_s),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        function, args = task
        try:
            results.put((rank, True, function(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, *, collective_timeout_s: float = 60.0) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
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

    def run(self, function: Callable[..., Any], *args: Any, timeout_s: float = 180.0) -> list[Any]:
        if self.broken:
            raise RuntimeError("this rank pool broke in an earlier test")
        for task_queue in self.tasks:
            task_queue.put((function, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self.results.get(timeout=timeout_s)
                outcomes[rank] = (ok, value)
        except queue.Empty:
            self.broken = True
            self.close()
            raise RankFailure(
                f"{function.__name__} did not finish on ranks "
                f"{sorted(set(range(self.world_size)) - set(outcomes))} within {timeout_s}s"
            ) from None
        failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failed:
            details = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failed.items()))
            raise RankFailure(f"{function.__name__} failed on ranks {sorted(failed)}:\n{details}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for task_queue in self.tasks:
            with contextlib.suppress(ValueError, OSError):
                task_queue.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
