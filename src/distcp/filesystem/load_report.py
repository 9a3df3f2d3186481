"""What one rank's load read: the counts behind "reads only what it needs"."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["LoadReport"]


@dataclass
class LoadReport:
    """Counts for one rank's last load.

    ``bytes_needed``: bytes the plan's items need. ``bytes_read``: bytes taken
    from the data files — the distinct regions needed, plus whole checksum
    blocks read only to verify them (the operating system reads whole pages
    beneath either). ``bytes_verified``: bytes read whose checksums were
    verified. ``split_blocks``: checksum blocks this rank read in part and
    verified together with other ranks (their masked crcs).
    ``bytes_fetched``: bytes transferred from a store that is not mapped (an
    object store), neighbouring ranges coalesced; 0 on local disk.
    """

    bytes_needed: int = 0
    bytes_read: int = 0
    bytes_verified: int = 0
    items: int = 0
    split_blocks: int = 0
    bytes_fetched: int = 0
    pending_verified: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(
        self,
        *,
        needed: int = 0,
        read: int = 0,
        verified: int = 0,
        items: int = 0,
        split_blocks: int = 0,
        pending_verified: int = 0,
        fetched: int = 0,
    ) -> None:
        with self._lock:
            self.bytes_needed += needed
            self.bytes_read += read
            self.bytes_verified += verified
            self.items += items
            self.split_blocks += split_blocks
            self.pending_verified += pending_verified
            self.bytes_fetched += fetched

    def settle(self) -> None:
        """The split blocks were verified across ranks: count their bytes."""
        with self._lock:
            self.bytes_verified += self.pending_verified
            self.pending_verified = 0

    @property
    def read_amplification(self) -> float:
        """Bytes read ÷ bytes needed (1.0 is ideal)."""
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0
