"""Encoding and decoding of the metadata file (``docs/format.md``, "Metadata file").

The file is a fixed 24-byte header followed by a msgpack body::

    0   8  magic   b"\\x89DCP\\r\\n\\x1a\\n"
    8   4  format version, uint32 little-endian (1)
    12  4  crc32c of the body, uint32 little-endian
    16  8  body length in bytes, uint64 little-endian
    24  …  body: a msgpack map (schema in docs/format.md)

Decoding validates everything before anything is read from a data file:
version, checksums, types, file names (plain names inside the checkpoint),
chunk boxes (inside the global shape, no overlaps, tiling it exactly), byte
lengths (dtype itemsize × numel), and that every byte range lies inside its
file's recorded size. Nothing here ever unpickles.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import crc32c
import msgpack
import torch

from distcp.codecs import EXTENSION_PREFIX, ZSTD, is_known_codec
from distcp.dtypes import dtype_from_name, dtype_name
from distcp.errors import CheckpointError, CheckpointFormatError
from distcp.geometry import Box
from distcp.hash_spread import HashSpread
from distcp.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageInfo,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.tiling import tiling_problem
from distcp.value_codec import decode_value, encode_value

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "SaveFacts",
    "decode_metadata",
    "encode_metadata",
    "is_safe_file_name",
    "read_save_facts",
]

MAGIC = b"\x89DCP\r\n\x1a\n"
FORMAT_VERSION = 1
TRANSFORM_VERSION = 2
"""Version 2 is version 1 plus items stored through a user's stream transform
(codec ``ext:<descriptor>``), written only by saves that use one: a reader that
predates it would take such an item's bytes for raw ones (a transform may keep
the length), so it must refuse the file by its version instead."""
READABLE_VERSIONS = (FORMAT_VERSION, TRANSFORM_VERSION)
_HEADER = struct.Struct("<8sIIQ")
CHECKSUM_ALGORITHM = "crc32c"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")

T = TypeVar("T")


def is_safe_file_name(name: str) -> bool:
    """A data file name must be a plain name inside the checkpoint directory:
    no separators, no ``..``, no leading dot, no absolute path."""
    return bool(_SAFE_NAME.fullmatch(name)) and ".." not in name


def encode_metadata(metadata: Metadata, *, save_id: str, world_size: int) -> bytes:
    """Encode ``metadata`` (whose ``storage_data`` maps every item to a
    :class:`StorageInfo`) into the bytes of a metadata file."""
    storage: Mapping[MetadataIndex, StorageInfo] = metadata.storage_data or {}
    files: dict[str, int] = {}
    file_sizes: list[int] = []
    block_sizes = {info.checksum_block_size for info in storage.values()}
    if len(block_sizes) > 1:
        raise CheckpointFormatError(f"items use different checksum block sizes {block_sizes}")
    block_size = block_sizes.pop() if block_sizes else 1 << 20

    def location(key: str, index: MetadataIndex) -> dict[str, Any]:
        info = storage.get(index)
        if info is None:
            raise CheckpointFormatError(
                f"key {key!r}: item {index.offset} was planned but no storage wrote it"
            )
        file_number = files.setdefault(info.relative_path, len(files))
        if file_number == len(file_sizes):
            file_sizes.append(0)
        file_sizes[file_number] = max(file_sizes[file_number], info.offset + info.length)
        where = {
            "file": file_number,
            "offset": info.offset,
            "length": info.length,
            "crc32c": list(info.checksums),
        }
        if info.codec is not None:
            if index.offset is None and info.codec == ZSTD:
                raise CheckpointFormatError(
                    f"key {key!r}: a value's bytes cannot be zstd; only tensor chunks are"
                )
            if not is_known_codec(info.codec):
                raise CheckpointFormatError(f"key {key!r}: unknown codec {info.codec!r}")
            where["codec"] = info.codec
        return where

    entries: list[dict[str, Any]] = []
    for key, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            chunks = [
                {
                    "offsets": list(chunk.offsets),
                    "sizes": list(chunk.sizes),
                    **location(key, MetadataIndex(key, chunk.offsets)),
                }
                for chunk in entry.chunks
            ]
            entries.append(
                {
                    "key": key,
                    "type": "tensor",
                    "dtype": dtype_name(entry.properties.dtype),
                    "shape": list(entry.size),
                    "requires_grad": bool(entry.properties.requires_grad),
                    "chunks": chunks,
                }
            )
        else:
            entries.append({"key": key, "type": "value", **location(key, MetadataIndex(key))})

    body = {
        "save_id": save_id,
        "created": time.time(),
        "library": _library_version(),
        "world_size": world_size,
        "checksum": {"algorithm": CHECKSUM_ALGORITHM, "block_size": block_size},
        "files": [{"name": name, "size": file_sizes[n]} for name, n in files.items()],
        "entries": entries,
        "planner_data": _encode_opaque(metadata.planner_data, "planner_data"),
        "storage_meta": _encode_storage_meta(metadata.storage_meta),
    }
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    transformed = any((info.codec or "").startswith(EXTENSION_PREFIX) for info in storage.values())
    version = TRANSFORM_VERSION if transformed else FORMAT_VERSION
    header = _HEADER.pack(MAGIC, version, crc32c.crc32c(payload), len(payload))
    return header + payload


def decode_metadata(data: bytes, *, source: str) -> tuple[Metadata, dict[str, int]]:
    """Decode and validate a metadata file's bytes.

    Returns the metadata and the size each data file must have. ``source``
    (the file's path) is named in every error.
    """
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise CheckpointFormatError(
            f"{source} is not a distcp metadata file (bad magic). If it is a torch DCP "
            "checkpoint, load it with torch.distributed.checkpoint or convert it."
        )
    _, version, checksum, length = _HEADER.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise CheckpointFormatError(
            f"{source} has format version {version}; this distcp reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade distcp to read it."
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CheckpointFormatError(
            f"{source}: body is {len(payload)} bytes, header says {length} (truncated?)"
        )
    if crc32c.crc32c(payload) != checksum:
        raise CheckpointFormatError(f"{source}: metadata checksum mismatch (corrupt metadata)")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise CheckpointFormatError(f"{source}: metadata body does not decode: {exc}") from exc
    return _MetadataDecoder(source, version).decode(body)


class _MetadataDecoder:
    """Checks a decoded body field by field, naming the field in every error."""

    def __init__(self, source: str, version: int = FORMAT_VERSION) -> None:
        self.source = source
        self.version = version

    def fail(self, message: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.source}: {message}")

    def get(self, record: Any, name: str, kind: type[T] | tuple[type, ...], where: str) -> T:
        if not isinstance(record, dict) or name not in record:
            raise self.fail(f"{where}: missing field {name!r}")
        value = record[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"{where}.{name}: expected {_kind_name(kind)}, got {value!r:.80}")
        return value  # type: ignore[return-value]

    def ints(self, record: Any, name: str, where: str, *, minimum: int = 0) -> list[int]:
        values = self.get(record, name, list, where)
        if not set(map(type, values)) <= {int}:  # msgpack decodes integers as exactly int
            raise self.fail(f"{where}.{name}: expected a list of integers")
        if values and min(values) < minimum:
            raise self.fail(f"{where}.{name}: values below {minimum}: {values}")
        return values

    def decode(self, body: Any) -> tuple[Metadata, dict[str, int]]:
        if not isinstance(body, dict):
            raise self.fail("metadata body is not a map")
        save_id = self.get(body, "save_id", str, "metadata")
        self.get(body, "created", (int, float), "metadata")
        self.get(body, "library", str, "metadata")
        if self.get(body, "world_size", int, "metadata") < 1:
            raise self.fail(f"world_size must be at least 1, got {body['world_size']}")
        checksum = self.get(body, "checksum", dict, "metadata")
        algorithm = self.get(checksum, "algorithm", str, "checksum")
        if algorithm != CHECKSUM_ALGORITHM:
            raise self.fail(f"unknown checksum algorithm {algorithm!r}")
        block_size = self.get(checksum, "block_size", int, "checksum")
        if block_size <= 0:
            raise self.fail(f"checksum block size must be positive, got {block_size}")

        names: list[str] = []
        sizes: dict[str, int] = {}
        for n, record in enumerate(self.get(body, "files", list, "metadata")):
            name = self.get(record, "name", str, f"files[{n}]")
            size = self.get(record, "size", int, f"files[{n}]")
            if not is_safe_file_name(name):
                raise self.fail(
                    f"files[{n}]: unsafe file name {name!r} (must stay inside the "
                    "checkpoint directory: no '/', '..' or leading '.')"
                )
            if name in sizes or size < 0:
                raise self.fail(f"files[{n}]: duplicate name or negative size for {name!r}")
            names.append(name)
            sizes[name] = size

        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        storage: dict[MetadataIndex, StorageInfo] = {}

        def place(record: Any, where: str, *, chunk: bool) -> StorageInfo:
            file_number = self.get(record, "file", int, where)
            offset = self.get(record, "offset", int, where)
            length = self.get(record, "length", int, where)
            checksums = self.ints(record, "crc32c", where)
            if not 0 <= file_number < len(names):
                raise self.fail(f"{where}: file index {file_number} out of range")
            name = names[file_number]
            if offset < 0 or length < 0 or offset + length > sizes[name]:
                raise self.fail(
                    f"{where}: byte range [{offset}, {offset + length}) lies outside "
                    f"file {name!r} of {sizes[name]} bytes"
                )
            if len(checksums) != -(-length // block_size):
                raise self.fail(
                    f"{where}: expected {-(-length // block_size)} crc32c values "
                    f"({length} bytes in blocks of {block_size}), got {len(checksums)}"
                )
            if any(c >= 1 << 32 for c in checksums):
                raise self.fail(f"{where}: crc32c values must be 32-bit unsigned integers")
            codec = record.get("codec")  # optional, absent in checkpoints before it existed
            if codec is not None and not is_known_codec(codec):
                raise self.fail(
                    f"{where}: unknown codec {codec!r:.80} (this distcp knows 'zstd' and "
                    "'ext:<descriptor>')"
                )
            transformed = isinstance(codec, str) and codec.startswith(EXTENSION_PREFIX)
            if transformed and self.version < TRANSFORM_VERSION:
                raise self.fail(
                    f"{where}: codec {codec!r} needs format version {TRANSFORM_VERSION}, "
                    f"the header says {self.version}"
                )
            if codec == ZSTD and not chunk:
                raise self.fail(f"{where}: a value cannot be zstd ({codec!r})")
            return StorageInfo(name, offset, length, tuple(checksums), block_size, codec)

        for n, record in enumerate(self.get(body, "entries", list, "metadata")):
            key = self.get(record, "key", str, f"entries[{n}]")
            where = f"key {key!r}"
            if key in state:
                raise self.fail(f"{where} appears twice")
            kind = self.get(record, "type", str, where)
            if kind == "value":
                state[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = place(record, where, chunk=False)
                continue
            if kind != "tensor":
                raise self.fail(f"{where}: unknown entry type {kind!r}")
            dtype = self._dtype(self.get(record, "dtype", str, where), where)
            shape = self.ints(record, "shape", where)
            requires_grad = self.get(record, "requires_grad", bool, where)
            chunks, boxes = [], []
            spread = HashSpread()  # the offsets become keys of `storage`
            for c, chunk in enumerate(self.get(record, "chunks", list, where)):
                chunk_where = f"{where} chunk {c}"
                offsets = self.ints(chunk, "offsets", chunk_where)
                chunk_sizes = self.ints(chunk, "sizes", chunk_where)
                box = self._box(offsets, chunk_sizes, shape, chunk_where)
                problem = spread.add(tuple(offsets))
                if problem is not None:
                    raise self.fail(f"{chunk_where}: offsets {offsets}: {problem}")
                if MetadataIndex(key, offsets) in storage:
                    raise self.fail(f"{chunk_where}: another chunk has the same offsets {offsets}")
                info = place(chunk, chunk_where, chunk=True)
                raw_length = box.numel * dtype.itemsize
                if info.codec is None and info.length != raw_length:
                    raise self.fail(
                        f"{chunk_where}: {info.length} bytes stored, but "
                        f"{box.numel} × {dtype} needs {raw_length}"
                    )
                if info.codec == ZSTD and info.length >= raw_length:
                    raise self.fail(
                        f"{chunk_where}: a {info.codec} chunk of {info.length} bytes is not "
                        f"shorter than its {raw_length} raw bytes (writers store those raw)"
                    )
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(chunk_sizes)))
                boxes.append(box)
                storage[MetadataIndex(key, offsets)] = info
            self._check_tiling(boxes, shape, where)
            state[key] = TensorStorageMetadata(
                TensorProperties(dtype=dtype, requires_grad=requires_grad),
                torch.Size(shape),
                chunks,
            )

        metadata = Metadata(
            state_dict_metadata=state,
            planner_data=self._opaque(body.get("planner_data"), "planner_data"),
            storage_data=storage,
            storage_meta=self._storage_meta(body.get("storage_meta"), save_id),
            version=str(self.version),
        )
        return metadata, sizes

    def _dtype(self, name: str, where: str) -> torch.dtype:
        try:
            return dtype_from_name(name)
        except CheckpointFormatError as exc:
            raise self.fail(f"{where}: {exc}") from None

    def _box(self, offsets: list[int], sizes: list[int], shape: list[int], where: str) -> Box:
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise self.fail(f"{where}: offsets/sizes do not match the {len(shape)}-d shape")
        box = Box(tuple(offsets), tuple(sizes))
        if any(end > dim for end, dim in zip(box.ends, shape, strict=True)):
            raise self.fail(f"{where}: box {offsets}+{sizes} lies outside shape {shape}")
        return box

    def _check_tiling(self, boxes: list[Box], shape: list[int], where: str) -> None:
        if len(boxes) == 1 and boxes[0].sizes == tuple(shape):
            return  # one chunk, the whole tensor (its box was checked to start inside it)
        problem = tiling_problem(
            [box.offsets for box in boxes], [box.sizes for box in boxes], tuple(shape)
        )
        if problem is not None:
            raise self.fail(f"{where}: {problem.describe(Box.full(tuple(shape)).numel)}")

    def _opaque(self, value: Any, name: str) -> Any:
        if value is None:
            return None
        if not isinstance(value, bytes):
            raise self.fail(f"{name}: expected bytes")
        try:
            return decode_value(value, key=name)
        except CheckpointError as exc:  # a malformed or pickled value: never unpickled
            raise self.fail(str(exc)) from None

    def _storage_meta(self, value: Any, save_id: str) -> StorageMeta:
        if value is None:
            return StorageMeta(save_id=save_id)
        if not isinstance(value, dict):
            raise self.fail("storage_meta: expected a map")
        checkpoint_id = value.get("checkpoint_id")
        modules = value.get("modules", [])
        if (
            not isinstance(checkpoint_id, (str, type(None)))
            or not isinstance(modules, list)
            or not all(isinstance(m, str) for m in modules)
        ):
            raise self.fail(
                "storage_meta: bad field types (checkpoint_id must be a string or nil, "
                "modules a list of strings)"
            )
        return StorageMeta(checkpoint_id=checkpoint_id, save_id=save_id, modules=list(modules))


def _encode_opaque(value: Any, name: str) -> bytes | None:
    return None if value is None else encode_value(value, key=name)


def _encode_storage_meta(meta: StorageMeta | None) -> dict[str, Any] | None:
    if meta is None:
        return None
    checkpoint_id = None if meta.checkpoint_id is None else str(meta.checkpoint_id)
    return {"checkpoint_id": checkpoint_id, "modules": list(meta.modules)}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _library_version() -> str:
    from distcp import __version__

    return f"distcp {__version__}"


@dataclass(frozen=True)
class SaveFacts:
    """What a metadata file says about the save that wrote it."""

    version: int
    save_id: str
    created: float
    world_size: int
    library: str


def read_save_facts(data: bytes, *, source: str) -> SaveFacts:
    """The format version, save id, time, world size and writing library of
    a metadata file's bytes (validated as :func:`decode_metadata` does)."""
    decode_metadata(data, source=source)
    _, version, _, _ = _HEADER.unpack_from(data)
    body = msgpack.unpackb(data[_HEADER.size :], raw=False, strict_map_key=True, use_list=True)
    return SaveFacts(
        version=version,
        save_id=body["save_id"],
        created=float(body["created"]),
        world_size=body["world_size"],
        library=body["library"],
    )
