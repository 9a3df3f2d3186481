"""Timing, peak resident memory, page-cache eviction, ABBA order and medians.

Time: each rank waits at a barrier, starts its clock, runs the operation, waits
at a barrier again and stops its clock; the operation's time is the largest of
the ranks' times (they differ only by how late each left the first barrier).

Peak memory: before the first barrier each rank collects garbage, resets its
peak resident set size by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0;
it sets ``VmHWM`` back to the current ``VmRSS``), and notes ``VmRSS``. After the
second barrier it reads ``VmHWM``; the difference is the extra resident memory
the operation needed at its peak, exact (the kernel tracks it on every page
fault) and at no cost to the timed code. Where the reset is refused, a thread
samples ``VmRSS`` every millisecond instead (it can miss short peaks and takes
a little CPU). Both count anonymous memory and touched pages of mapped files
(``torch.load(mmap=True)`` maps its file), i.e. what the process holds resident.

Cold cache: before each cold operation every file of the checkpoint is fsynced
and dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``, or,
if that leaves pages resident, with ``sync; echo 3 > /proc/sys/vm/drop_caches``;
``mincore`` on each file then says how much of it is still resident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import mmap
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


# --- time and memory, on each rank --------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024


class PeakRss:
    """The peak extra resident memory of this process between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.method = (
            "VmHWM after a reset through /proc/self/clear_refs"
            if _reset_peak()
            else "VmRSS sampled every 1 ms by a thread"
        )
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0
        self._base = 0

    @property
    def sampled(self) -> bool:
        return not self.method.startswith("VmHWM")

    def start(self) -> None:
        gc.collect()
        if self.sampled:
            self._stop.clear()
            self._base = self._peak = _status_kib("VmRSS")
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        else:
            _reset_peak()
            self._base = _status_kib("VmRSS")

    def stop(self) -> int:
        """Bytes above the starting resident size at the peak."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            peak = self._peak
        else:
            peak = _status_kib("VmHWM")
        return max(0, peak - self._base) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _status_kib("VmRSS"))


def timed(operation: Callable[[], dict[str, Any]], peak: PeakRss) -> dict[str, Any]:
    """Run ``operation`` between two barriers; this rank's seconds, extra RSS, facts."""
    import torch.distributed as dist

    peak.start()
    dist.barrier()
    began = time.perf_counter()
    facts = operation()
    dist.barrier()
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rss_extra": peak.stop(), "facts": facts}


# --- rounds and statistics, in the driver -------------------------------------------


def abba(libraries: Sequence[_T], round_index: int) -> list[_T]:
    """Round ``i``'s order: as given on even rounds, reversed on odd ones (ABBA),
    so a drift over time (a filling disk cache, a warming CPU) favours no one."""
    return list(libraries) if round_index % 2 == 0 else list(reversed(libraries))


@dataclass(frozen=True)
class Summary:
    median: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values))


# --- the page cache, from the driver ------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    method: str  # "fadvise", "drop_caches" or "none"
    resident: float  # fraction of the checkpoint's pages still cached afterwards


def evict(path: Path, method: str) -> Eviction:
    """Drop the files under ``path`` from the page cache with ``method`` ("auto"
    tries posix_fadvise, then drop_caches) and measure what is left resident."""
    files = [p for p in path.rglob("*") if p.is_file()]
    if method in ("auto", "fadvise"):
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        left = resident_fraction(files)
        if left <= 0.01 or method == "fadvise":
            return Eviction("fadvise", left)
    if method in ("auto", "drop_caches"):
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as drop:
                drop.write("3")
        except OSError:
            return Eviction("none", resident_fraction(files))
        return Eviction("drop_caches", resident_fraction(files))
    return Eviction("none", resident_fraction(files))


def probe_eviction(directory: Path, method: str) -> Eviction:
    """Try ``method`` on a fresh 4 MiB file in ``directory``: which way works here."""
    if method == "none":
        return Eviction("none", 1.0)
    probe = directory / "cache-probe"
    probe.mkdir(parents=True, exist_ok=True)
    with open(probe / "probe.bin", "wb") as file:
        file.write(os.urandom(4 << 20))
        file.flush()
        os.fsync(file.fileno())
    try:
        result = evict(probe, method)
    finally:
        (probe / "probe.bin").unlink()
        probe.rmdir()
    return result if result.resident <= 0.01 else Eviction("none", result.resident)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_fraction(files: Sequence[Path]) -> float:
    """The fraction of the files' pages in the page cache (``mincore``)."""
    page = mmap.PAGESIZE
    resident = total = 0
    for file in files:
        size = file.stat().st_size
        if size == 0:
            continue
        pages = -(-size // page)
        fd = os.open(file, os.O_RDONLY)
        try:
            address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                continue
            vector = (ctypes.c_ubyte * pages)()
            try:
                if _libc.mincore(address, size, vector) == 0:
                    resident += sum(v & 1 for v in vector)
                    total += pages
            finally:
                _libc.munmap(address, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0
