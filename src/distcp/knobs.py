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

#: The most bytes a reader holds in a staging buffer at once when it cannot read
#: straight into the destination (casts, strided regions).
READ_WINDOW_SIZE = 64 << 20
