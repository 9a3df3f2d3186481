"""``DefaultSavePlanner``: flattens the state dict, plans one write per local
chunk and per value, and on the coordinator writes replicated items once with
the bytes balanced across ranks, then builds the metadata."""

from __future__ import annotations

import dataclasses
import io
from collections import defaultdict
from typing import Any

import torch

from distcp.dtypes import dtype_name
from distcp.errors import CheckpointError, ShapeMismatchError, UnsupportedValueError
from distcp.flatten import Path, flatten_state_dict
from distcp.geometry import Box, find_overlap
from distcp.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.planner import (
    BytesIOWriteData,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from distcp.tensor_layout import tensor_layout
from distcp.value_codec import encode_value

__all__ = ["DefaultSavePlanner"]


class DefaultSavePlanner(SavePlanner):
    """The save planner ``distcp.save`` uses unless given another.

    Args:
        flatten_state_dict: flatten nested containers to dotted keys (see ``flatten.py``).
        flatten_sharded_tensors: accepted for DCP compatibility (always on).
        dedup_replicated_tensors: accepted for DCP compatibility; replicated
            items are always written once.
        dedup_save_to_lowest_rank: write each replicated item from the lowest
            rank holding it instead of balancing the bytes across ranks.
        allow_pickle: save values the pickle-free encoding cannot represent with
            pickle (loading them then needs ``DefaultLoadPlanner(allow_pickle=True)``).
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        dedup_replicated_tensors: bool | None = None,
        dedup_save_to_lowest_rank: bool = False,
        enable_plan_caching: bool = False,
        *,
        allow_pickle: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.dedup_save_to_lowest_rank = dedup_save_to_lowest_rank
        self.enable_plan_caching = enable_plan_caching
        self.allow_pickle = allow_pickle
        self.state_dict: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        self.is_coordinator = False
        self._tensors: dict[MetadataIndex, torch.Tensor] = {}
        self._values: dict[str, bytes] = {}

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if self.flatten_state_dict:
            self.state_dict, self.paths = flatten_state_dict(state_dict)
        else:
            self.state_dict = dict(state_dict)
            self.paths = {key: (key,) for key in state_dict}
        self.storage_meta = storage_meta
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items: list[WriteItem] = []
        self._tensors.clear()
        self._values.clear()
        for key, value in self.state_dict.items():
            if isinstance(value, torch.Tensor):
                items.extend(self._tensor_items(key, value))
            else:
                data = encode_value(value, key=key, allow_pickle=self.allow_pickle)
                self._values[key] = data
                items.append(
                    WriteItem(
                        MetadataIndex(key),
                        WriteItemType.BYTE_IO,
                        bytes_io_data=BytesIOWriteData(len(data)),
                    )
                )
        paths = {key: list(path) for key, path in self.paths.items()}
        return SavePlan(items, planner_data=paths)

    def _tensor_items(self, key: str, value: torch.Tensor) -> list[WriteItem]:
        if value.device.type == "meta":
            raise UnsupportedValueError(
                f"key {key!r}: cannot save a meta tensor (it has no data); materialize it first"
            )
        layout = tensor_layout(key, value)
        dtype_name(layout.dtype)  # refuses dtypes the format cannot name
        properties = TensorProperties(dtype=layout.dtype, requires_grad=value.requires_grad)
        kind = WriteItemType.SHARD if layout.sharded else WriteItemType.TENSOR
        items = []
        for chunk in layout.chunks:
            index = MetadataIndex(key, chunk.box.offsets)
            self._tensors[index] = chunk.tensor
            data = TensorWriteData(
                ChunkStorageMetadata(torch.Size(chunk.box.offsets), torch.Size(chunk.box.sizes)),
                properties,
                torch.Size(layout.global_shape),
            )
            items.append(WriteItem(index, kind, tensor_data=data))
        return items

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        plans = _dedup_replicated(all_plans, balance=not self.dedup_save_to_lowest_rank)
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        paths: dict[str, list[str | int]] = {}
        for rank, plan in enumerate(plans):
            if isinstance(plan.planner_data, dict):  # a subclass may keep its own data there
                for key, path in plan.planner_data.items():
                    paths.setdefault(key, path)
            for item in plan.items:
                _add_to_metadata(state, item, rank)
        for key, entry in state.items():
            if isinstance(entry, TensorStorageMetadata):
                _check_chunks(key, entry)
        metadata = Metadata(
            state_dict_metadata=state, planner_data=paths, storage_meta=self.storage_meta
        )
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._values[write_item.index.fqn])
        return self._tensors[write_item.index]


def _dedup_replicated(plans: list[SavePlan], *, balance: bool) -> list[SavePlan]:
    """Keep each item (same key and chunk offsets) in one rank's plan only.

    Values are kept on the lowest rank holding them. Tensor chunks go, largest
    first, to the rank holding them with the fewest bytes assigned so far, so
    replicated state is written once and its writing is shared out.
    """
    holders: dict[MetadataIndex, list[int]] = defaultdict(list)
    first_item: dict[MetadataIndex, WriteItem] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            holders[item.index].append(rank)
            reference = first_item.setdefault(item.index, item)
            if item.tensor_data != reference.tensor_data or item.type != reference.type:
                raise ShapeMismatchError(
                    f"key {item.index.fqn!r}: rank {holders[item.index][0]} and rank {rank} "
                    f"hold it with different shapes, dtypes or kinds "
                    f"({_describe(reference)} vs {_describe(item)})"
                )
    loads = [0] * len(plans)
    owner: dict[MetadataIndex, int] = {}
    for index, ranks in holders.items():
        if len(ranks) == 1 or first_item[index].type == WriteItemType.BYTE_IO or not balance:
            owner[index] = ranks[0]
            loads[ranks[0]] += _size(first_item[index])
    replicated = [index for index, ranks in holders.items() if index not in owner]
    replicated.sort(key=lambda index: -_size(first_item[index]))
    for index in replicated:
        rank = min(holders[index], key=lambda r: (loads[r], r))
        owner[index] = rank
        loads[rank] += _size(first_item[index])
    return [
        dataclasses.replace(plan, items=[item for item in plan.items if owner[item.index] == rank])
        for rank, plan in enumerate(plans)
    ]


def _size(item: WriteItem) -> int:
    size = item.tensor_storage_size()
    if size is not None:
        return size
    return item.bytes_io_data.nbytes if item.bytes_io_data else 0


def _describe(item: WriteItem) -> str:
    if item.tensor_data is None:
        return "a value"
    data = item.tensor_data
    return f"{data.properties.dtype} {list(data.size)} chunk {list(data.chunk.sizes)}"


def _add_to_metadata(
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata], item: WriteItem, rank: int
) -> None:
    key = item.index.fqn
    existing = state.get(key)
    if item.tensor_data is None:
        if existing is not None:
            raise ShapeMismatchError(
                f"key {key!r} is a value on rank {rank} but a tensor on another rank"
            )
        state[key] = BytesStorageMetadata()
        return
    data = item.tensor_data
    if existing is None:
        existing = state[key] = TensorStorageMetadata(data.properties, data.size, [])
    if not isinstance(existing, TensorStorageMetadata):
        raise ShapeMismatchError(f"key {key!r} is a tensor on rank {rank} but a value elsewhere")
    if existing.size != data.size or existing.properties.dtype != data.properties.dtype:
        raise ShapeMismatchError(
            f"key {key!r}: rank {rank} has global shape {list(data.size)} "
            f"{data.properties.dtype}, another rank {list(existing.size)} "
            f"{existing.properties.dtype}"
        )
    existing.chunks.append(data.chunk)


def _check_chunks(key: str, entry: TensorStorageMetadata) -> None:
    """The chunks the ranks hold must tile the tensor: no overlap, no gap."""
    entry.chunks.sort(key=lambda chunk: tuple(chunk.offsets))
    boxes = [Box(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
    overlap = find_overlap(boxes)
    if overlap is not None:
        i, j = overlap
        raise CheckpointError(
            f"key {key!r}: ranks hold overlapping pieces {boxes[i]} and {boxes[j]} that are "
            "not the same replica; the sharding is inconsistent across ranks"
        )
    numel = Box.full(tuple(entry.size)).numel
    if sum(box.numel for box in boxes) != numel:
        raise CheckpointError(
            f"key {key!r}: the ranks' pieces cover {sum(b.numel for b in boxes)} of its {numel} "
            "elements; every element must be saved by some rank"
        )
