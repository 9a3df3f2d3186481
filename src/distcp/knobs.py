"""Tunables, gathered in one place with their defaults and the reason for each."""

from __future__ import annotations

import os

#: Bytes covered by one crc32c checksum inside a chunk. Smaller blocks let a
#: partial (resharding) read verify what it reads while reading less extra;
#: larger blocks shrink the metadata. 1 MiB costs 4 bytes of metadata per MiB.
CHECKSUM_BLOCK_SIZE = 1 << 20

#: Every chunk starts at a multiple of this many bytes in its data file, so a
#: reader can map chunks with any dtype's alignment.
CHUNK_ALIGNMENT = 64

#: Writer and reader threads per rank. File I/O and crc32c release the GIL.
DEFAULT_THREAD_COUNT = max(1, min(4, os.cpu_count() or 1))

#: Buffered-writer size: small tensors are coalesced into writes of this size.
WRITE_BUFFER_SIZE = 8 << 20

#: Bytes of a saved chunk a reader verifies and copies at a time (whole
#: checksum blocks, at least one): small enough that the bytes the checksum pass
#: brought into cache are still there for the copy into the destination.
READ_WINDOW_SIZE = 2 << 20

#: Bytes ``pread`` at a time straight into a destination tensor; each piece's
#: crc is taken right after, while the piece is still in the core's cache.
DIRECT_READ_SIZE = 256 << 10

#: A synced save starts the disk write of each data file every this many bytes
#: (``sync_file_range``), so the disk works while checksums and copies run and
#: the final fsync waits for little.
WRITEBACK_EVERY = 16 << 20

#: Seconds every rank waits, at each collective step of a save or load, for
#: the others to arrive before it raises ``CollectiveTimeoutError`` naming the
#: step and the ranks that did not (a hung rank otherwise holds every other
#: rank for the process group's timeout, 30 minutes by default). Generous,
#: because the ranks' local work between steps differs in length (the slowest
#: rank's write of its share of a large state); ``timeout=`` of
#: save/load/async_save sets it per call, ``DISTCP_COLLECTIVE_TIMEOUT`` here.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("DISTCP_COLLECTIVE_TIMEOUT", "600"))
