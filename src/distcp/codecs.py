"""Per-chunk codecs: DCP's ``_extensions=[ZStandard()]`` as zstd-compressed chunks.

A compressed chunk is stored as one zstd frame that records its content size;
its crc32c blocks cover the *stored* (compressed) bytes and are verified before
decompressing, and the frame must hold exactly the chunk's ``numel × itemsize``
bytes: the frame header's content size is checked before any output is
allocated, so a hostile frame cannot make a reader allocate more than the chunk
needs. A chunk that does not get smaller is stored raw (no codec), so every
compressed chunk is shorter than its raw bytes and a reader that ignores the
codec field refuses it on the length rule instead of misreading it. The metadata
records ``"codec": "zstd"`` on the chunk (docs/format.md). Values (non-tensor
items) stay uncompressed: the format records no decompressed size for them, so
their output could not be bounded before decompressing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zstandard

from distcp.errors import CorruptCheckpointError, UnsupportedStorageError

__all__ = ["CODECS", "ZSTD", "codec_for_extensions", "compress", "decompress"]

ZSTD = "zstd"
CODECS = frozenset({ZSTD})
_LEVEL = 3  # zstd's default: fast, and what torch DCP's ZStandard extension uses


def codec_for_extensions(extensions: Sequence[Any] | None) -> str | None:
    """The codec DCP's ``_extensions`` ask for: ``"zstd"`` for torch's
    ``ZStandard`` (or anything whose ``registry_name()`` is ``"stream.zstd"``),
    None for none; any other extension raises naming it."""
    codec = None
    for extension in extensions or ():
        name = _registry_name(extension)
        if name != "stream.zstd":
            raise UnsupportedStorageError(
                f"FileSystemWriter(_extensions=[{type(extension).__name__}]): distcp supports "
                "only torch DCP's ZStandard() extension (zstd); for other stream transforms "
                "use torch's FileSystemWriter, which distcp.save drives"
            )
        codec = ZSTD
    return codec


def _registry_name(extension: Any) -> str | None:
    name = getattr(extension, "registry_name", None)
    try:
        return str(name()) if callable(name) else None
    except Exception:  # a foreign extension whose name needs arguments
        return None


def compress(data: memoryview) -> bytes:
    """One zstd frame holding ``data`` (its size recorded in the frame header)."""
    compressor = zstandard.ZstdCompressor(level=_LEVEL, write_content_size=True)
    return bytes(compressor.compress(data))


def decompress(
    data: memoryview | bytes | bytearray, expected: int, *, file: str, offset: int
) -> bytes:
    """The ``expected`` bytes that the one zstd frame ``data`` holds; a frame
    that claims or holds any other size, does not decode, or is followed by
    more bytes is corruption (of ``file`` at ``offset``)."""
    stored = bytes(data)

    def corrupt(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{file}: the zstd frame at offset {offset} {problem}", file=file, offset=offset
        )

    try:
        claimed = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as error:
        raise corrupt(f"has no valid frame header: {error}") from None
    # zstandard reports an absent content size as -1 (CONTENTSIZE_UNKNOWN in C).
    if claimed < 0 or claimed == zstandard.CONTENTSIZE_UNKNOWN:  # distcp always records it
        raise corrupt(f"does not record its content size (the chunk needs {expected} bytes)")
    if claimed != expected:
        raise corrupt(f"claims {claimed} bytes, the chunk needs {expected}")
    frame = zstandard.ZstdDecompressor().decompressobj()
    try:
        # Output is bounded by the header's content size, checked above.
        raw = frame.decompress(stored)
    except zstandard.ZstdError as error:
        raise corrupt(f"does not decompress: {error}") from None
    if not frame.eof or frame.unused_data:
        raise corrupt("is truncated or followed by other bytes")
    if len(raw) != expected:
        raise corrupt(f"holds {len(raw)} bytes, the chunk needs {expected}")
    return raw
