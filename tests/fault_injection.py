"""Fault injection at every I/O step and collective of a save.

:func:`injecting` patches, for the duration of a block, the calls a save
makes on the checkpoint directory (opening, writing, flushing, fsyncing,
renaming, listing and removing files, starting writeback, taking the lock)
and the collectives of ``torch.distributed`` that distcp's coordinator uses.
Each call is an *event*, numbered from 0 in the order this process makes
them. At event ``at`` the fault strikes: ``"kill"`` sends this process
SIGKILL (as a crash or the OOM killer would), ``"ENOSPC"`` / ``"EIO"`` make
that call raise ``OSError`` (collectives are not failed by errno faults: a
collective does no I/O). With ``at=None`` nothing strikes and the block only
counts, which is how a campaign learns how many events a save has.

Used by ``tests/test_fault_campaign.py``; the patches are process-wide, so a
campaign runs them in processes of its own.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist

from distcp.filesystem import directory_lock
from distcp.stores import local as writer

COLLECTIVES = ("gather_object", "scatter_object_list", "broadcast_object_list", "monitored_barrier")


class Injector:
    """Counts events and strikes at one of them."""

    def __init__(self, root: str, fault: str, at: int | None) -> None:
        self.root = os.path.abspath(root)
        self.fault, self.at = fault, at
        self.events: list[str] = []

    def event(self, what: str, *, io: bool = True) -> None:
        number = len(self.events)
        self.events.append(what)
        if number != self.at:
            return
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if io:
            code = errno.ENOSPC if self.fault == "ENOSPC" else errno.EIO
            raise OSError(code, f"{os.strerror(code)} (injected at event {number}: {what})")

    def ours(self, path: Any) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.root)
        except TypeError:  # a descriptor
            return False


class _File:
    """A file opened in the checkpoint directory: its writes are events."""

    def __init__(self, file: Any, injector: Injector, name: str) -> None:
        self._file, self._injector, self._name = file, injector, name

    def write(self, data: Any) -> int:
        self._injector.event(f"write {self._name}")
        return self._file.write(data)  # type: ignore[no-any-return]

    def flush(self) -> None:
        self._injector.event(f"flush {self._name}")
        self._file.flush()

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


@contextlib.contextmanager
def injecting(root: str, fault: str = "count", at: int | None = None) -> Iterator[Injector]:
    injector = Injector(root, fault, at)
    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, replacement: Any) -> None:
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not injector.ours(file) or not any(c in mode for c in "wax+"):
            return real_open(file, mode, *args, **kwargs)
        name = os.path.basename(os.fspath(file))
        injector.event(f"open {name}")
        return _File(real_open(file, mode, *args, **kwargs), injector, name)

    def on_path(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if injector.ours(path):
                injector.event(f"{name} {os.path.basename(os.fspath(path))}")
            return real(path, *args, **kwargs)

        return call

    def on_call(name: str, real: Callable[..., Any], *, io: bool = True) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            injector.event(name, io=io)
            return real(*args, **kwargs)

        return call

    patch(builtins, "open", open_)
    for name in ("replace", "unlink", "scandir", "open", "mkdir"):
        patch(os, name, on_path(name, getattr(os, name)))
    patch(os, "fsync", on_call("fsync", os.fsync))
    patch(os, "pwrite", on_call("pwrite", os.pwrite))
    patch(writer, "start_writeback", on_call("writeback", writer.start_writeback))
    patch(directory_lock.fcntl, "flock", on_call("flock", directory_lock.fcntl.flock))
    for name in COLLECTIVES:
        patch(dist, name, on_call(name, getattr(dist, name), io=False))
    try:
        yield injector
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
