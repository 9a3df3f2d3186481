"""The storage interfaces: torch DCP's own ``StorageWriter`` / ``StorageReader``.

Storage decides where bytes go and never interprets a state dict. The classes
are ``torch.distributed.checkpoint.storage``'s, so a storage class written for
torch DCP is one for distcp too. The orchestration in ``api.py`` calls, on every
rank unless noted:

Save: ``reset`` → ``set_up_storage_writer`` → ``prepare_local_plan`` →
(coordinator) ``prepare_global_plan`` → ``write_data`` → (coordinator) ``finish``.

Load: ``reset`` → ``read_metadata`` → ``set_up_storage_reader`` →
``prepare_local_plan`` → (coordinator) ``prepare_global_plan`` → ``read_data``.

``write_data`` and ``read_data`` return a future. torch's storage returns a
``torch.futures.Future`` (``wait()``/``value()``), other code a
``concurrent.futures.Future`` (``result()``); :func:`wait_future` takes either,
and distcp's own storage returns futures that answer both (:func:`done_future`).
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

__all__ = ["StorageReader", "StorageWriter", "WriteResult", "done_future", "wait_future"]

T = TypeVar("T")


def wait_future(future: Any) -> Any:
    """The value of a storage future of either kind, raising its error."""
    if hasattr(future, "wait") and not hasattr(future, "result"):
        return future.wait()  # torch.futures.Future: wait() returns the value
    if hasattr(future, "result"):
        return future.result()  # concurrent.futures.Future (and ours)
    raise TypeError(
        f"storage returned {type(future).__name__!r}, which is not a future: expected a "
        "torch.futures.Future or a concurrent.futures.Future"
    )


class DoneFuture(torch.futures.Future[Any]):
    """A finished ``torch.futures.Future`` that also answers ``result()``, the
    ``concurrent.futures`` spelling, so that code written for either works."""

    def result(self, timeout: float | None = None) -> Any:
        return self.wait()


def done_future(value: T) -> torch.futures.Future[T]:
    """``value`` as a finished future that both torch DCP (``wait()``) and
    ``concurrent.futures`` code (``result()``) can wait on."""
    future = DoneFuture()
    future.set_result(value)
    return future
