"""Per-item codecs: DCP's ``_extensions``. ``[ZStandard()]`` stores tensor
chunks as zstd frames; any other stream transform (``StreamTransformExtension``)
is applied to every item and named in the metadata as ``ext:<descriptor>``.

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

A stream transform is the user's own code (an encryption, say): its bytes are
checksummed as stored, it runs at load only if the loader passes a registry
holding it, and a tensor chunk must decode to exactly its raw size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import zstandard

from distcp.errors import CorruptCheckpointError, UnsupportedStorageError

__all__ = [
    "EXTENSION_PREFIX",
    "ZSTD",
    "Codec",
    "codec_for_extensions",
    "compress",
    "decode_stored",
    "decompress",
    "is_known_codec",
]

ZSTD = "zstd"
EXTENSION_PREFIX = "ext:"
"""A codec named ``ext:<descriptor>`` is a DCP stream-transform extension (the
descriptor is its ``get_descriptor()``, e.g. ``stream.rot13/1``), applied to
tensor chunks and values alike; a reader decodes it only through the
``_extension_registry`` its caller passed."""
_LEVEL = 3  # zstd's default: fast, and what torch DCP's ZStandard extension uses
_MAX_DESCRIPTOR = 256


class Codec:
    """How a writer encodes items: ``name`` goes into the metadata."""

    name: str
    values_too: bool

    def encode(self, data: memoryview) -> bytes | None:
        """The stored bytes for ``data``; None to store ``data`` raw."""
        raise NotImplementedError


class _Zstd(Codec):
    name, values_too = ZSTD, False

    def encode(self, data: memoryview) -> bytes | None:
        packed = compress(data)
        return packed if len(packed) < len(data) else None  # a zstd chunk is always shorter


class _StreamTransform(Codec):
    """A foreign DCP ``StreamTransformExtension``: every item goes through it."""

    values_too = True

    def __init__(self, extension: Any) -> None:
        self.extension = extension
        self.name = EXTENSION_PREFIX + str(extension.get_descriptor())
        if not is_known_codec(self.name):
            raise UnsupportedStorageError(
                f"FileSystemWriter(_extensions=[{type(extension).__name__}]): its descriptor "
                f"{self.name[len(EXTENSION_PREFIX) :]!r} is not a short printable name"
            )

    def encode(self, data: memoryview) -> bytes | None:
        sink = _Sink()
        stream = self.extension.transform_to(sink)
        stream.write(data)
        stream.close()  # flushes the transform's tail into the sink
        return bytes(sink.getbuffer())


class _Sink(io.BytesIO):
    """What a transform writes into; closing it (transforms close their
    output) must not discard the bytes."""

    def close(self) -> None:
        pass


def codec_for_extensions(extensions: Sequence[Any] | None) -> Codec | None:
    """The codec DCP's ``_extensions`` ask for: zstd for torch's ``ZStandard``
    (or anything whose ``registry_name()`` is ``"stream.zstd"``), a stream
    transform for any other ``StreamTransformExtension``, None for none. One
    extension at most: a chain would need its order recorded too."""
    chosen = list(extensions or ())
    if not chosen:
        return None
    if len(chosen) > 1:
        names = ", ".join(type(extension).__name__ for extension in chosen)
        raise UnsupportedStorageError(
            f"FileSystemWriter(_extensions=[{names}]): distcp applies one extension at a time"
        )
    (extension,) = chosen
    if _registry_name(extension) == "stream.zstd":
        return _Zstd()
    if not all(callable(getattr(extension, m, None)) for m in ("transform_to", "get_descriptor")):
        raise UnsupportedStorageError(
            f"FileSystemWriter(_extensions=[{type(extension).__name__}]): not a DCP "
            "StreamTransformExtension (transform_to, transform_from, get_descriptor)"
        )
    return _StreamTransform(extension)


def is_known_codec(name: object) -> bool:
    """Whether ``name`` is a codec the format defines: ``"zstd"`` or
    ``"ext:<descriptor>"`` with a short printable descriptor."""
    if name == ZSTD:
        return True
    if not isinstance(name, str) or not name.startswith(EXTENSION_PREFIX):
        return False
    descriptor = name[len(EXTENSION_PREFIX) :]
    return 0 < len(descriptor) <= _MAX_DESCRIPTOR and descriptor.isprintable()


def decode_stored(
    codec: str,
    stored: bytes | bytearray,
    expected: int | None,
    *,
    registry: Any,
    file: str,
    offset: int,
) -> bytes:
    """The raw bytes of an item stored with ``codec``: ``expected`` of them
    for a tensor chunk (anything else is corruption), any number for a value.
    A stream transform is looked up in ``registry`` (DCP's
    ``ExtensionRegistry``, from ``FileSystemReader(_extension_registry=...)``):
    a reader never runs a transform its caller did not hand it."""
    if codec == ZSTD:
        assert expected is not None  # a value is never zstd
        return decompress(stored, expected, file=file, offset=offset)
    descriptor = codec[len(EXTENSION_PREFIX) :]
    try:
        (extension,) = (registry or _default_registry()).from_descriptor_list([descriptor])
    except Exception as error:
        raise UnsupportedStorageError(
            f"{file}: the item at offset {offset} was written through the stream transform "
            f"{descriptor!r}, which this reader does not have ({error}); pass "
            "FileSystemReader(path, _extension_registry=registry) with it registered"
        ) from None
    limit = -1 if expected is None else expected + 1
    try:
        raw = extension.transform_from(io.BytesIO(bytes(stored))).read(limit)
    except Exception as error:
        raise CorruptCheckpointError(
            f"{file}: the item at offset {offset} does not decode through {descriptor!r}: {error}",
            file=file,
            offset=offset,
        ) from None
    if expected is not None and len(raw) != expected:
        raise CorruptCheckpointError(
            f"{file}: the item at offset {offset} decodes through {descriptor!r} to "
            f"{'more than ' if len(raw) > expected else ''}{min(len(raw), expected)} bytes, "
            f"the chunk needs {expected}",
            file=file,
            offset=offset,
        )
    return bytes(raw)


def _default_registry() -> Any:
    from torch.distributed.checkpoint._extension import ExtensionRegistry

    return ExtensionRegistry()


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
