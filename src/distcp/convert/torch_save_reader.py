"""``BroadcastingTorchSaveReader``: ``distcp.load`` from one ``torch.save`` file
on N ranks, reading the file on one rank only.

The load's coordinator opens the file (memory-mapped, ``weights_only``) while
planning: it checks that every key some rank asks for is there, and tells all
ranks, with their plans, the dtype and shape of each tensor it will send and
the encoded bytes of each value. While reading, it broadcasts the tensors one
at a time over a CPU (gloo) group, in that agreed order; each rank copies the
parts its shards need and drops the tensor. So no rank but the coordinator
needs the file, and no rank holds more than one whole tensor beyond its state.

A rank whose copy fails (a shape or dtype mismatch) keeps taking part in every
broadcast and raises at the end, so the others are never left waiting in a
collective; ``distcp.load`` then raises the same error on every rank.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distcp.convert.buffers import transient_tensor
from distcp.convert.dynamic_meta import DynamicPlanData
from distcp.convert.torch_save_file import load_torch_save
from distcp.distributed import cpu_group
from distcp.dtypes import is_lossless_cast
from distcp.errors import (
    CheckpointError,
    CheckpointFormatError,
    DtypeMismatchError,
    KeyMismatchError,
    ShapeMismatchError,
)
from distcp.flatten import flatten_state_dict
from distcp.metadata import Metadata, TensorStorageMetadata
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from distcp.storage import StorageReader, done_future
from distcp.value_codec import encode_value

__all__ = ["BroadcastingTorchSaveReader"]


@dataclass(frozen=True)
class _Tensor:
    """A tensor the coordinator will broadcast."""

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Value:
    """A value, sent with the plans in distcp's (pickle-free) encoding."""

    fqn: str
    data: bytes


@dataclass(frozen=True)
class _Broadcasts:
    """Each plan's ``storage_data``: the global rank sending the tensors (None
    in a load of one process) and what is sent, in order."""

    source: int | None
    entries: tuple[_Tensor | _Value, ...]


class BroadcastingTorchSaveReader(StorageReader):
    """A storage reader for one ``torch.save`` file: the coordinator reads it
    and broadcasts each tensor to the ranks, which keep their shards of it.

    Use it with :class:`~distcp.format_utils.DynamicMetaLoadPlanner`::

        distcp.load(
            {"model": model.state_dict()},  # DTensors and plain tensors, any sharding
            checkpoint_id="model.pt",
            storage_reader=BroadcastingTorchSaveReader(),
            planner=DynamicMetaLoadPlanner(),
        )

    Args:
        checkpoint_id: the ``torch.save`` file (or pass ``checkpoint_id`` to ``load``).
        coordinator_rank: the rank that reads the file; it must be the load's
            coordinator (rank 0 for ``distcp.load``).
    """

    def __init__(
        self, checkpoint_id: str | os.PathLike[str] | None = None, coordinator_rank: int = 0
    ) -> None:
        self.checkpoint_id = None if checkpoint_id is None else Path(checkpoint_id)
        self.coordinator_rank = coordinator_rank
        self.is_coordinator = False
        self._tensors: dict[str, torch.Tensor] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.checkpoint_id = Path(checkpoint_id)
        self._tensors = {}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return Path(checkpoint_id).is_file()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Empty: the planner (``DynamicMetaLoadPlanner``) describes the source
        from the state dict, and the coordinator checks it against the file."""
        return Metadata(state_dict_metadata={})

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """On the coordinator: open the file, check every requested key, and
        tell each rank what will be sent (dropping keys the file lacks where
        the planner allows a partial load)."""
        distributed = len(plans) > 1
        if distributed and dist.get_rank() != self.coordinator_rank:
            raise CheckpointError(
                f"BroadcastingTorchSaveReader(coordinator_rank={self.coordinator_rank}) is used "
                f"in a load coordinated by rank {dist.get_rank()}: the reading rank must be the "
                "load's coordinator (pass the same coordinator_rank to load_state_dict)"
            )
        path = self._path()
        state = load_torch_save(path)
        flat, _ = flatten_state_dict(state)
        partial = all(
            isinstance(plan.planner_data, DynamicPlanData) and plan.planner_data.allow_partial_load
            for plan in plans
        )
        entries: dict[str, _Tensor | _Value] = {}
        missing: list[str] = []
        self._tensors = {}
        for item in (item for plan in plans for item in plan.items):
            key = item.storage_index.fqn
            if key in entries or key in missing:
                continue
            value = flat[key] if key in flat else state.get(key, _MISSING)
            if value is _MISSING:
                missing.append(key)
            elif item.type == LoadItemType.BYTE_IO:
                entries[key] = _Value(key, encode_value(value, key=key))
            else:
                entries[key] = self._tensor_entry(key, value, path)
        if missing and not partial:
            raise KeyMismatchError(
                missing,
                hint=f"{path} has {len(flat)} keys, e.g. {sorted(flat)[:5]}; load a subset "
                "with DynamicMetaLoadPlanner(allow_partial_load=True)",
            )
        source = dist.get_rank() if distributed else None
        info = _Broadcasts(source, tuple(entries.values()))
        return [
            dataclasses.replace(
                plan,
                items=[i for i in plan.items if i.storage_index.fqn in entries],
                storage_data=info,
            )
            for plan in plans
        ]

    def _tensor_entry(self, key: str, value: Any, path: Path) -> _Tensor:
        if not isinstance(value, torch.Tensor):
            raise ShapeMismatchError(
                f"key {key!r}: the state dict asks for a tensor but {path} holds a "
                f"{type(value).__name__} there"
            )
        if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
            raise CheckpointFormatError(
                f"key {key!r}: {path} holds a {type(value).__name__}; only plain tensors can "
                "be broadcast from a torch.save file"
            )
        if value.layout != torch.strided:
            raise CheckpointFormatError(f"key {key!r}: {path} holds a {value.layout} tensor")
        self._tensors[key] = value.detach()
        return _Tensor(key, value.dtype, tuple(value.shape))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        info = plan.storage_data
        if not isinstance(info, _Broadcasts):
            raise CheckpointError(
                "BroadcastingTorchSaveReader.read_data got a plan its prepare_global_plan did "
                "not make"
            )
        mine: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            mine.setdefault(item.storage_index.fqn, []).append(item)
        group = None
        sending = True
        if info.source is not None:
            world = dist.group.WORLD
            assert world is not None
            group = cpu_group(world)
            sending = dist.get_rank() == info.source
        failures: list[BaseException] = []
        try:
            for entry in info.entries:
                if isinstance(entry, _Value):
                    for item in mine.get(entry.fqn, []):
                        _attempt(failures, planner.load_bytes, item, io.BytesIO(entry.data))
                    continue
                tensor = (
                    self._sent(entry) if sending else transient_tensor(entry.shape, entry.dtype)
                )
                if group is not None and tensor.numel():
                    # As bytes: gloo has no bool, complex or 8-bit float tensors.
                    dist.broadcast(tensor.reshape(-1).view(torch.uint8), info.source, group=group)
                for item in mine.get(entry.fqn, []):
                    _attempt(failures, self._copy, item, tensor, planner)
                del tensor
        finally:
            self._tensors = {}
        if failures:
            raise failures[0]
        return done_future(None)

    def _sent(self, entry: _Tensor) -> torch.Tensor:
        tensor = self._tensors.pop(entry.fqn, None)
        if tensor is None:
            raise CheckpointError(f"key {entry.fqn!r}: the coordinator lost its tensor to send")
        return tensor.contiguous()

    def _copy(self, item: ReadItem, tensor: torch.Tensor, planner: LoadPlanner) -> None:
        key = item.storage_index.fqn
        path = self._path()
        expected = getattr(getattr(planner, "metadata", None), "state_dict_metadata", {}).get(key)
        shape = tuple(tensor.shape)
        if isinstance(expected, TensorStorageMetadata) and tuple(expected.size) != shape:
            raise ShapeMismatchError(
                f"key {key!r}: {path} holds shape {list(shape)}, the state dict asks for "
                f"{list(expected.size)}"
            )
        offsets, lengths = tuple(item.storage_offsets), tuple(item.lengths)
        if len(offsets) != len(shape) or any(
            o + n > size for o, n, size in zip(offsets, lengths, shape, strict=False)
        ):
            raise ShapeMismatchError(
                f"key {key!r}: the state dict reads elements at {list(offsets)} of size "
                f"{list(lengths)}, outside the shape {list(shape)} that {path} holds"
            )
        dest = planner.resolve_tensor(item).detach()
        if not (
            is_lossless_cast(tensor.dtype, dest.dtype)
            or getattr(planner, "allow_dtype_cast", False)
        ):
            raise DtypeMismatchError(
                f"key {key!r}: {path} holds {tensor.dtype}, the state dict asks for {dest.dtype}, "
                "and the cast loses precision; pass DynamicMetaLoadPlanner(allow_dtype_cast=True) "
                "to cast anyway"
            )
        region = tensor
        for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
            region = region.narrow(dim, offset, length)
        dest.copy_(region)
        planner.commit_tensor(item, dest)

    def _path(self) -> Path:
        if self.checkpoint_id is None:
            raise ValueError(
                "BroadcastingTorchSaveReader has no file: pass checkpoint_id to it or to load"
            )
        return self.checkpoint_id


_MISSING: Any = object()


def _attempt(failures: list[BaseException], function: Any, *args: Any) -> None:
    """Run ``function``; keep its error for after the broadcasts instead of
    leaving the other ranks waiting in one."""
    try:
        function(*args)
    except Exception as error:
        failures.append(error)
