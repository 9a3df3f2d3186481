"""Storage on a local or shared file system (DCP's ``filesystem`` module path)."""

from typing import Any

from torch.distributed.checkpoint.filesystem import SerializationFormat

from distcp.filesystem.reader import FileSystemReader, LoadReport
from distcp.filesystem.writer import FileSystemWriter

__all__ = ["FileSystemReader", "FileSystemWriter", "LoadReport", "SerializationFormat"]

_NOT_HERE = {
    "FileSystemBase": "distcp's storage does its own file I/O (mmap, pread, sync_file_range)",
    "FileSystem": "distcp's storage does its own file I/O (mmap, pread, sync_file_range)",
}


def __getattr__(name: str) -> Any:
    reason = _NOT_HERE.get(name)
    if reason is None:
        raise AttributeError(f"module 'distcp.filesystem' has no attribute {name!r}")
    raise AttributeError(
        f"distcp.filesystem.{name} is not provided: {reason}. For torch DCP's file-system "
        f"abstraction use torch.distributed.checkpoint.filesystem.{name}; its storage "
        "classes work with distcp.save/load."
    )
