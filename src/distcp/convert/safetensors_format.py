"""Hugging Face safetensors files, read and written a tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``), then the tensors' raw little-endian bytes,
``data_offsets`` counted from the end of the header. Its writer here knows
every tensor's size before it writes the first byte, so it writes the header
first and then each tensor as it arrives: peak memory is one tensor, whatever
the file's size (``safetensors.torch.save_file`` needs them all at once).
Files are written under a temporary name and renamed into place.

A sharded export is Hugging Face's layout: ``model-00001-of-00003.safetensors``
… and ``model.safetensors.index.json`` (``{"metadata": {"total_size": N},
"weight_map": {name: file}}``); a single file is ``model.safetensors``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distcp.errors import CheckpointFormatError, CheckpointNotFoundError, UnsupportedValueError
from distcp.filesystem.layout import new_save_id

__all__ = [
    "INDEX_FILE_NAME",
    "SafetensorsEntry",
    "dtype_from_safetensors",
    "read_header",
    "safetensors_files",
    "write_safetensors",
    "write_sharded",
]

INDEX_FILE_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
#: A header longer than this is refused before it is read (safetensors' own limit).
MAX_HEADER_BYTES = 100 << 20

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_from_safetensors(name: str, *, where: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise CheckpointFormatError(f"{where}: unknown safetensors dtype {name!r}")
    return dtype


def safetensors_dtype(dtype: torch.dtype, *, key: str) -> str:
    name = _NAMES.get(dtype)
    if name is None:
        raise UnsupportedValueError(
            f"key {key!r}: safetensors has no dtype for {dtype}; convert with --dtype or "
            "leave the key out (--keys)"
        )
    return name


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: where its bytes are (absolute file offsets)."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    length: int


def read_header(path: Path) -> tuple[list[SafetensorsEntry], dict[str, str]]:
    """The tensors of the safetensors file at ``path``, validated (offsets
    inside the file, sizes matching dtype × shape, no two tensors sharing
    bytes), and its ``__metadata__``."""
    where = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(f"{where} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointFormatError(
                    f"{where} is not a safetensors file (header of {length} bytes)"
                )
            raw = file.read(length)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no safetensors file at {where}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"{where}: the header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{where}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(f"{where}: __metadata__ is not an object")
    start = 8 + length
    entries = []
    for name, spec in header.items():
        entries.append(_entry(name, spec, path, start, size))
    spans = sorted((e.offset, e.offset + e.length, e.name) for e in entries if e.length)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise CheckpointFormatError(f"{where}: tensors {first!r} and {second!r} overlap")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(name: str, spec: Any, path: Path, start: int, size: int) -> SafetensorsEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise CheckpointFormatError(f"{where}: not an object")
    dtype = dtype_from_safetensors(str(spec.get("dtype")), where=where)
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
    ):
        raise CheckpointFormatError(f"{where}: malformed shape or data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end or start + end > size:
        raise CheckpointFormatError(
            f"{where}: bytes [{begin}, {end}) lie outside the file's {size - start} data bytes"
        )
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointFormatError(
            f"{where}: {end - begin} bytes for shape {shape} of {dtype} "
            f"({math.prod(shape) * dtype.itemsize} expected)"
        )
    return SafetensorsEntry(name, path.name, dtype, tuple(shape), start + begin, end - begin)


def safetensors_files(path: Path) -> list[Path]:
    """The files of a safetensors checkpoint: ``path`` itself, the files its
    folder's index names, or every ``*.safetensors`` file in the folder."""
    if path.is_file():
        return [path]
    index = path / INDEX_FILE_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise CheckpointFormatError(f"{index}: not a safetensors index ({error})") from None
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or "/" in n or n.startswith(".")]
        if bad:
            raise CheckpointFormatError(f"{index}: file names outside the folder: {bad[:3]}")
        return [path / name for name in names]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise CheckpointNotFoundError(f"no safetensors files in {path}")
    return found


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file of ``tensors`` (name, dtype, shape), each
    fetched when its turn comes; return the bytes written."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in tensors:
        length = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": safetensors_dtype(dtype, key=name),
            "shape": list(shape),
            "data_offsets": [offset, offset + length],
        }
        offset += length
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    temporary = path.with_name(f".{path.name}.tmp-{new_save_id()}")
    try:
        with open(temporary, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for name, dtype, shape in tensors:
                tensor = fetch(name)
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise CheckpointFormatError(
                        f"key {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                        f"planned {dtype} {shape}"
                    )
                data = tensor.detach().contiguous().reshape(-1)
                if data.numel():
                    file.write(data.view(torch.uint8).numpy().data)
                del tensor, data
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return 8 + len(encoded) + offset


def write_sharded(
    folder: Path,
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
    fetch: Callable[[str], torch.Tensor],
    max_shard_size: int | None,
) -> list[Path]:
    """Hugging Face's sharded layout in ``folder``: files of at most
    ``max_shard_size`` tensor bytes (a larger tensor gets a file of its own)
    and the index, or one ``model.safetensors`` when everything fits."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    filled = 0
    for entry in tensors:
        length = math.prod(entry[2]) * entry[1].itemsize
        if max_shard_size is not None and shards[-1] and filled + length > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += length
    folder.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        names = [SINGLE_FILE_NAME]
    else:
        names = [
            f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
        ]
    written = []
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(folder / name, shard, fetch)
        written.append(folder / name)
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in tensors)
        weight_map = {
            key: name for name, shard in zip(names, shards, strict=True) for key, *_ in shard
        }
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(folder / INDEX_FILE_NAME)
    return written
