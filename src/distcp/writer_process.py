"""The writer process behind ``AsyncCheckpointerType.PROCESS``.

One per training process, started on its first process-mode ``async_save``
and kept for the next ones. It runs :func:`serve` in a fresh interpreter
(the training script is not re-imported, CUDA and the training's threads are
not inherited) and talks to its parent over a Unix
socket pair. The parent stages the items this rank writes into a ``memfd``
arena (:mod:`distcp.staging_arena`) and passes the arena's descriptor once; each job
then carries only the storage writer, this rank's final plan and the slots of
the staged items. The child writes the data files (checksums and file I/O off
the training process's GIL) and sends back the write results, or the error;
the parent commits, so the child needs no process group.

The messages between the two are pickled: both ends are this library, and the
socket is private to the pair. Checkpoint files are never unpickled.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import torch

from distcp.distributed import sendable_error
from distcp.errors import CheckpointError
from distcp.planner import SavePlan, WriteItem
from distcp.staging_arena import Arena, StagedPlanner, StagedSave
from distcp.storage import StorageWriter, WriteResult, wait_future

__all__ = ["WriterProcess", "serve"]

#: Items per message of a job (see :func:`_batches`).
_BATCH_ITEMS = 256

_CHILD_MAIN = "import sys; from distcp.writer_process import serve; serve(int(sys.argv[1]))"


class WriterProcess:
    """The parent's handle on its writer process; one job at a time."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
        theirs.close()
        self.connection = Connection(ours.detach())
        self._arena: Arena | None = None  # the arena the child has mapped
        self._lock = threading.Lock()
        atexit.register(self.close)

    def write(
        self, writer: StorageWriter, plan: SavePlan, staged: StagedSave, arena: Arena
    ) -> list[WriteResult]:
        """Have the child write ``plan``'s items from the arena; its results, or
        its error raised here."""
        with self._lock:
            new_arena = arena is not self._arena
            batches = _batches(plan, staged)
            try:
                header = replace(plan, items=[])
                self.connection.send(("write", writer, header, arena.size, new_arena, len(batches)))
            except (OSError, EOFError) as error:
                raise self._died() from error
            except Exception as error:  # pickling the job failed: nothing was sent
                raise CheckpointError(
                    "AsyncCheckpointerType.PROCESS sends the storage writer and plan to the "
                    f"writer process, and {type(writer).__name__}'s job could not be pickled: "
                    f"{error}"
                ) from error
            try:
                for batch in batches:
                    self.connection.send(batch)
                if new_arena:
                    assert arena.fd is not None
                    send_handle(self.connection, arena.fd, self.process.pid)
                    self._arena = arena
                outcome, payload = self.connection.recv()
            except Exception as error:  # the pair is out of step now: start afresh next time
                self._arena = None
                died = self._died()
                if self.alive():
                    self.process.kill()
                raise died from error
        if outcome == "error":
            raise payload
        return payload  # type: ignore[no-any-return]

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Stop the child (it finishes the job in hand first)."""
        atexit.unregister(self.close)
        with contextlib.suppress(OSError, EOFError):
            self.connection.send(("stop",))
        self.connection.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _died(self) -> CheckpointError:
        try:  # its end of the socket closed: it is exiting, if not gone already
            code: int | None = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        what = f"died with exit code {code}" if code is not None else "stopped answering"
        return CheckpointError(
            f"the async-save writer process (pid {self.process.pid}) {what}; nothing was "
            "committed, and the next async save starts a new writer process"
        )


def _batches(plan: SavePlan, staged: StagedSave) -> list[tuple[list[WriteItem], StagedSave]]:
    """The plan's items and their staged parts in batches. A job is pickled a
    batch at a time: pickling is one call that holds the GIL, and a 10,000-item
    plan pickled whole stalled the training thread for ~0.2 s after
    ``async_save`` had returned."""
    out = []
    for start in range(0, len(plan.items), _BATCH_ITEMS):
        items = plan.items[start : start + _BATCH_ITEMS]
        part = StagedSave(
            {i.index: staged.slots[i.index] for i in items if i.index in staged.slots},
            {i.index: staged.values[i.index] for i in items if i.index in staged.values},
        )
        out.append((items, part))
    return out


def serve(fd: int) -> None:
    """The child's loop over the socket ``fd``: write each job from the mapped
    arena, answer, repeat until told to stop or the parent is gone."""
    connection = Connection(fd)
    torch.set_num_threads(1)
    arena: torch.Tensor | None = None
    mapping: mmap.mmap | None = None
    while True:
        try:
            message: tuple[Any, ...] = connection.recv()
        except EOFError:  # the parent is gone
            return
        if message[0] == "stop":
            return
        _, writer, header, size, new_arena, count = message
        items: list[WriteItem] = []
        staged = StagedSave({}, {})
        for _ in range(count):
            part_items, part = connection.recv()
            items += part_items
            staged.slots.update(part.slots)
            staged.values.update(part.values)
        plan = replace(header, items=items)
        if new_arena:
            arena = None
            if mapping is not None:
                with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                    mapping.close()
            fd = recv_handle(connection)
            mapping = mmap.mmap(fd, max(size, 1))
            os.close(fd)
            arena = torch.frombuffer(mapping, dtype=torch.uint8)[:size]
        try:
            assert arena is not None
            results = wait_future(writer.write_data(plan, StagedPlanner(staged, arena)))
            connection.send(("ok", results))
        except Exception as error:
            connection.send(("error", sendable_error(error)))
