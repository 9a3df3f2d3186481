"""``SafetensorsReader``: a Hugging Face safetensors file or folder (one file,
or shards with ``model.safetensors.index.json``) as a storage reader, so
``distcp.load`` loads it straight into any layout (DTensors on N ranks
included) — what torchtitan calls an initial load from HF weights.

Each rank maps the files it needs and copies out only the regions its
shards cover (pages are read when touched), casting where the destination's
dtype differs. Headers are validated before anything is read (offsets inside
the file, sizes matching dtype × shape, no overlaps). safetensors carries no
checksums: what this reader can promise is bounds, not integrity.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distcp.convert.safetensors_format import SafetensorsEntry, read_header, safetensors_files
from distcp.errors import CheckpointFormatError, CheckpointNotFoundError
from distcp.filesystem.load_report import LoadReport
from distcp.filesystem.tensor_bytes import narrowed
from distcp.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner
from distcp.storage import StorageReader, done_future

__all__ = ["SafetensorsReader"]


@dataclass(frozen=True)
class _Location:
    file: str
    offset: int
    length: int


class SafetensorsReader(StorageReader):
    """Reads a safetensors file, or a folder of them, for ``distcp.load``.

    Keys are the tensors' names as stored (``model.layers.0.mlp.up_proj.weight``);
    pass a flat state dict with those keys (or rename them in the state dict
    you load into). ``report`` counts the bytes needed and copied.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.metadata: Metadata | None = None
        self.entries: dict[str, SafetensorsEntry] = {}
        self.report = LoadReport()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.metadata = None
        self.report = LoadReport()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        path = Path(checkpoint_id)
        return path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if not self.path.exists():
            raise CheckpointNotFoundError(f"no safetensors checkpoint at {self.path}")
        entries: dict[str, SafetensorsEntry] = {}
        for file in safetensors_files(self.path):
            found, _ = read_header(file)
            for entry in found:
                if entry.name in entries:
                    raise CheckpointFormatError(
                        f"{self.path}: tensor {entry.name!r} is in both "
                        f"{entries[entry.name].file} and {entry.file}"
                    )
                entries[entry.name] = entry
        self.entries = entries
        state: dict[str, Any] = {}
        storage: dict[MetadataIndex, _Location] = {}
        for name, entry in entries.items():
            zeros = torch.Size([0] * len(entry.shape))
            state[name] = TensorStorageMetadata(
                TensorProperties(dtype=entry.dtype),
                torch.Size(entry.shape),
                [ChunkStorageMetadata(zeros, torch.Size(entry.shape))],
            )
            storage[MetadataIndex(name, zeros)] = _Location(entry.file, entry.offset, entry.length)
        self.metadata = Metadata(
            state_dict_metadata=state,
            planner_data={name: [name] for name in entries},
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=self.path),
        )
        return self.metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        if self.metadata is None:
            raise CheckpointFormatError("read_data called before read_metadata")
        self.report = LoadReport()
        folder = self.path if self.path.is_dir() else self.path.parent
        files = _MappedFiles(folder)
        lock = threading.Lock()
        try:
            for item in plan.items:
                if item.type != LoadItemType.TENSOR:
                    raise CheckpointFormatError(
                        f"key {item.storage_index.fqn!r}: safetensors holds only tensors"
                    )
                entry = self.entries[item.storage_index.fqn]
                source = narrowed(files.tensor(entry), item.storage_offsets, item.lengths)
                with lock:
                    dest = planner.resolve_tensor(item)
                dest.copy_(source)
                nbytes = source.numel() * entry.dtype.itemsize
                self.report.add(needed=nbytes, read=nbytes, items=1)
                with lock:
                    planner.commit_tensor(item, dest)
        finally:
            files.close()
        return done_future(None)


class _MappedFiles:
    """The files a load reads, each mapped once. Opened following links, unlike
    distcp's own data files: a Hugging Face cache folder is links into its blob store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[str, tuple[mmap.mmap | None, torch.Tensor]] = {}

    def tensor(self, entry: SafetensorsEntry) -> torch.Tensor:
        if entry.length == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        if entry.file not in self._maps:
            with open(self.folder / entry.file, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
            self._maps[entry.file] = (mapping, torch.frombuffer(mapping, dtype=torch.uint8))
        data = self._maps[entry.file][1]
        if entry.offset + entry.length > data.numel():
            raise CheckpointFormatError(
                f"{self.folder / entry.file}: tensor {entry.name!r} lies past the file's end "
                "(changed since its header was read)"
            )
        raw = data[entry.offset : entry.offset + entry.length]
        if raw.data_ptr() % entry.dtype.itemsize:
            raw = raw.clone()
        return raw.view(entry.dtype).view(entry.shape)

    def close(self) -> None:
        for mapping, _ in self._maps.values():
            if mapping is not None:
                with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                    mapping.close()
        self._maps.clear()
