"""Pausing Python's cyclic garbage collector around bulk object work.

Decoding the metadata and planning a save or load of many tensors allocate
hundreds of thousands of small objects, none of them in reference cycles. Each
burst of allocations triggers collections, and the older generations' scans
walk every live container, the caller's whole state dict included: for a
10,000-tensor checkpoint that was half the cost of decoding its metadata. The
collector is paused for the duration and resumed (if it was on) afterwards;
nothing is lost, cycles made meanwhile are collected then.

Nested and concurrent pauses from several threads are counted: the collector
resumes when the last one ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["gc_paused"]

_lock = threading.Lock()
_depth = 0
_resume = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
