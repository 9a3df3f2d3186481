"""Persistent rank processes joined over gloo, driven one task at a time.

The processes start once (``spawn``; torch import and process-group set-up are
never timed) and then run module-level functions on request:
``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank and
returns the results in rank order, raising if any rank raised.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any


class RankError(RuntimeError):
    """A task failed on one or more ranks; the message holds their tracebacks."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, tasks: Any, results: Any
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    warnings.filterwarnings("ignore")
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
    while (task := tasks.get()) is not None:
        function, args = task
        try:
            results.put((rank, True, function(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, *, timeout_s: float = 900.0) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        port = _free_port()
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, world_size, port, timeout_s, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, function: Callable[..., Any], *args: Any) -> list[Any]:
        for tasks in self._tasks:
            tasks.put((function, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        timeout_s = self.timeout_s
        try:
            while len(outcomes) < self.world_size:
                rank, ok, value = self._results.get(timeout=timeout_s)
                outcomes[rank] = (ok, value)
                if not ok:  # the others may wait for it in a collective: do not wait long
                    timeout_s = 10.0
        except queue.Empty:
            missing = sorted(set(range(self.world_size)) - set(outcomes))
            outcomes.update({r: (False, "(no answer: stuck or dead)") for r in missing})
            self.close()
        failed = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        if failed:
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
            raise RankError(f"{function.__name__} failed on ranks {sorted(failed)}:\n{details}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for tasks in self._tasks:
            with contextlib.suppress(ValueError, OSError):
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
