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

# --- object stores (distcp.stores.fsspec_store) ---


def _env_bytes(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


#: Bytes of each part of a multipart upload of a data object (S3 and
#: S3-compatible stores; at least 5 MiB there). The part size doubles every
#: 1,000 parts, so an object stays within S3's 10,000 parts up to ~85 TiB.
#: ``DISTCP_UPLOAD_PART_SIZE``.
UPLOAD_PART_SIZE = _env_bytes("DISTCP_UPLOAD_PART_SIZE", 16 << 20)

#: A data object up to this size is sent in one put when it is complete
#: (buffered meanwhile: at most this much per writer thread); a larger one is a
#: multipart upload. ``DISTCP_UPLOAD_SINGLE_PUT_LIMIT``.
UPLOAD_SINGLE_PUT_LIMIT = _env_bytes("DISTCP_UPLOAD_SINGLE_PUT_LIMIT", 64 << 20)

#: Parts of one data object uploading at once; with the part being filled,
#: a writer thread holds at most ``(UPLOAD_CONCURRENCY + 1) × UPLOAD_PART_SIZE``
#: bytes. ``DISTCP_UPLOAD_CONCURRENCY``.
UPLOAD_CONCURRENCY = _env_bytes("DISTCP_UPLOAD_CONCURRENCY", 4)

#: Ranged reads from an object store in flight at once per rank.
#: ``DISTCP_READ_CONCURRENCY``.
READ_CONCURRENCY = _env_bytes("DISTCP_READ_CONCURRENCY", 16)

#: Largest single ranged read; a longer range is split into reads of this size
#: that run in parallel. ``DISTCP_READ_PART_SIZE``.
READ_PART_SIZE = _env_bytes("DISTCP_READ_PART_SIZE", 16 << 20)

#: Neighbouring ranges of one object closer than this are fetched as one read
#: (the gap is transferred, and counted in ``LoadReport.bytes_fetched``). On
#: S3 a request costs about as much time as 1 MiB of transfer (tens of ms to
#: the first byte, tens of MB/s per connection), so a column-sliced reshard
#: fetches whole rows in a few reads instead of half rows in thousands. Lower
#: it where transfer is metered. ``DISTCP_COALESCE_GAP``.
COALESCE_GAP = _env_bytes("DISTCP_COALESCE_GAP", 1 << 20)

#: Bytes a rank fetches from an object store ahead of decoding them: the next
#: batch of chunks is fetched while the current one is verified and copied, so
#: about twice this is held at once (or one chunk's needed bytes, if larger).
#: ``DISTCP_FETCH_BATCH``.
FETCH_BATCH = _env_bytes("DISTCP_FETCH_BATCH", 32 << 20)
