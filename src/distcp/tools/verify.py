"""``distcp verify``: every checksum of every file, offline.

For a distcp checkpoint each data file is read once, front to back, by one
of a pool of threads (files in parallel), and every block of every item is
checked against its CRC-32C; sizes are checked first. Damage is reported per
item: the key, the file, the byte offset of the first bad block. Torch DCP
checkpoints and safetensors files carry no checksums: what can be checked is
that every file is there with every recorded byte range inside it (and, for a
``torch.save`` zip, the archive's own CRC-32 of each record), and the report
says so.
"""

from __future__ import annotations

import os
import zipfile
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crc32c

from distcp.convert.sources import detect_format
from distcp.errors import CheckpointError, CorruptCheckpointError
from distcp.filesystem.reader import FileSystemReader
from distcp.filesystem.safe_open import open_regular_file
from distcp.metadata import MetadataIndex, StorageInfo

__all__ = ["verify_checkpoint"]

_READ_SIZE = 8 << 20


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    threads: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """``{"ok": bool, "format", "checked", "bytes", "damaged": [...], "unchecked": str}``."""
    location = Path(path)
    kind = detect_format(location)
    if kind == "distcp":
        return _verify_distcp(location, threads, on_progress)
    if kind == "torch-dcp":
        return _verify_bounds(location, kind, on_progress)
    if kind == "safetensors":
        from distcp.safetensors_storage import SafetensorsReader

        reader = SafetensorsReader(location)
        reader.read_metadata()  # headers, bounds, overlaps
        return _result(
            kind,
            [],
            len(reader.entries),
            0,
            "safetensors has no checksums: headers, bounds and overlaps checked",
        )
    return _verify_zip(location)


def _result(
    kind: str, damaged: list[dict[str, Any]], checked: int, nbytes: int, unchecked: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": not damaged,
        "format": kind,
        "checked_items": checked,
        "checked_bytes": nbytes,
        "damaged": damaged,
    }
    if unchecked:
        out["unchecked"] = unchecked
    return out


def _verify_distcp(
    location: Path, threads: int, on_progress: Callable[[int], None] | None
) -> dict[str, Any]:
    reader = FileSystemReader(location)
    metadata = reader.read_metadata()
    by_file: dict[str, list[tuple[MetadataIndex, StorageInfo]]] = defaultdict(list)
    for index, info in metadata.storage_data.items():
        by_file[info.relative_path].append((index, info))
    sizes = reader.file_sizes

    def check_file(name: str) -> list[dict[str, Any]]:
        items = sorted(by_file[name], key=lambda pair: pair[1].offset)
        try:
            fd = open_regular_file(location / name, "data file")
        except CheckpointError as error:
            return [_damage(index, name, info.offset, str(error)) for index, info in items]
        damaged = []
        try:
            actual = os.fstat(fd).st_size
            expected = sizes.get(name)
            if expected is not None and actual != expected:
                damaged.append(
                    {
                        "key": None,
                        "file": name,
                        "offset": min(actual, expected),
                        "problem": f"{actual} bytes, the metadata records {expected}",
                    }
                )
            # One read buffer per file, reused for every item in it.
            largest_block = max((info.checksum_block_size for _, info in items), default=1)
            view = memoryview(bytearray(max(_READ_SIZE, largest_block)))
            for index, info in items:
                problem = _check_item(fd, info, actual, view, on_progress)
                if problem is not None:
                    damaged.append(_damage(index, name, *problem))
        finally:
            os.close(fd)
        return damaged

    damaged: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="distcp-verify") as pool:
        for found in pool.map(check_file, sorted(by_file)):
            damaged.extend(found)
    total = sum(info.length for info in metadata.storage_data.values())
    return _result("distcp", damaged, len(metadata.storage_data), total, None)


def _damage(index: MetadataIndex, file: str, offset: int, problem: str) -> dict[str, Any]:
    chunk = list(index.offset) if index.offset is not None else None
    return {"key": index.fqn, "chunk": chunk, "file": file, "offset": offset, "problem": problem}


def _check_item(
    fd: int,
    info: StorageInfo,
    size: int,
    view: memoryview,
    on_progress: Callable[[int], None] | None,
) -> tuple[int, str] | None:
    """The first bad block of one item as ``(file offset, problem)``, or
    None; ``view`` is a read buffer of at least one checksum block."""
    if info.offset + info.length > size:
        return info.offset, f"bytes [{info.offset}, {info.offset + info.length}) pass the end"
    block = info.checksum_block_size
    done = 0
    number = 0
    while done < info.length:
        want = min(len(view) // block * block, info.length - done)
        got = os.preadv(fd, [view[:want]], info.offset + done)
        if got != want:
            return info.offset + done, "short read"
        for start in range(0, want, block):
            piece = view[start : min(start + block, want)]
            if crc32c.crc32c(piece) != info.checksums[number]:
                return info.offset + done + start, "checksum mismatch"
            number += 1
        done += want
        if on_progress is not None:
            on_progress(want)
    return None


def _verify_bounds(
    location: Path, kind: str, on_progress: Callable[[int], None] | None
) -> dict[str, Any]:
    """torch DCP: every referenced file present and every byte range inside it."""
    reader = FileSystemReader(location)
    unchecked = (
        "torch DCP checkpoints carry no checksums: files and byte ranges checked, not contents"
    )
    try:
        metadata = reader.read_metadata()  # checks every file's size against its ranges
    except CorruptCheckpointError as error:
        damage = {"key": None, "file": error.file, "offset": error.offset, "problem": str(error)}
        return _result(kind, [damage], 0, 0, unchecked)
    damaged = []
    sizes: dict[str, int | None] = {}
    for index, info in metadata.storage_data.items():
        name = getattr(info, "relative_path", None)
        offset = int(getattr(info, "offset", 0))
        length = int(getattr(info, "length", 0))
        if name is None:
            continue
        if name not in sizes:
            file = location / name
            sizes[name] = file.stat().st_size if file.is_file() else None
        size = sizes[name]
        if size is None:
            damaged.append(_damage(index, name, 0, "the file is missing"))
        elif offset + length > size:
            damaged.append(_damage(index, name, offset, f"bytes past the file's {size}"))
    del on_progress
    return _result(
        kind,
        damaged,
        len(metadata.storage_data),
        0,
        unchecked,
    )


def _verify_zip(location: Path) -> dict[str, Any]:
    """A ``torch.save`` file: the zip archive's own CRC-32 of every record."""
    if not zipfile.is_zipfile(location):
        return _result(
            "torch.save", [], 0, 0, "a legacy (pre-zip) torch.save file has no checksums"
        )
    with zipfile.ZipFile(location) as archive:
        bad = archive.testzip()
        total = sum(info.file_size for info in archive.infolist())
        count = len(archive.infolist())
    damaged = (
        []
        if bad is None
        else [{"key": None, "file": bad, "offset": None, "problem": "zip CRC mismatch"}]
    )
    return _result("torch.save", damaged, count, total, None)
