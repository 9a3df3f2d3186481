"""Per-chunk codecs: DCP's ``_extensions=[ZStandard()]`` as zstd-compressed chunks.

A compressed chunk is stored as one zstd frame; its crc32c blocks cover the
*stored* (compressed) bytes and are verified before decompressing, and the
decompressed size must be the chunk's ``numel × itemsize``. The metadata
records ``"codec": "zstd"`` on the chunk (docs/format.md). Values (non-tensor
items) are small and stay uncompressed.
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
    """The ``expected`` bytes a frame holds; anything else is corruption."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=expected)
    except zstandard.ZstdError as error:
        raise CorruptCheckpointError(
            f"{file}: the zstd frame at offset {offset} does not decompress: {error}",
            file=file,
            offset=offset,
        ) from None
    if len(raw) != expected:
        raise CorruptCheckpointError(
            f"{file}: the zstd frame at offset {offset} holds {len(raw)} bytes, the chunk "
            f"needs {expected}",
            file=file,
            offset=offset,
        )
    return bytes(raw)
