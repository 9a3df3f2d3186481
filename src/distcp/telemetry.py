"""Timing the phases of a save or load, for whoever asks.

``with recording("save") as record:`` around a :func:`distcp.save` (or
``load``) collects, on this rank, the seconds spent in each phase the call
passes through — ``plan``, ``write``, ``commit`` for a save; ``plan``,
``read``, ``verify`` for a load — and the bytes it wrote or read. Outside a
``recording`` block the phase markers cost a context-variable lookup. The
checkpoint manager (:mod:`distcp.manager`) uses it for its log.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["PhaseRecord", "add_bytes", "phase", "recording"]


@dataclass
class PhaseRecord:
    """What one rank spent in one save or load."""

    kind: str
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds


_current: contextvars.ContextVar[PhaseRecord | None] = contextvars.ContextVar(
    "distcp_phase_record", default=None
)


@contextmanager
def recording(kind: str) -> Iterator[PhaseRecord]:
    record = PhaseRecord(kind)
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Count the time inside the block as phase ``name`` of the recording in
    progress, if any."""
    record = _current.get()
    if record is None:
        yield
        return
    began = time.perf_counter()
    try:
        yield
    finally:
        record.add(name, time.perf_counter() - began)


def add_bytes(count: int) -> None:
    record = _current.get()
    if record is not None:
        record.bytes += count
