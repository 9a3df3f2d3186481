"""``DefaultSavePlanner``: flattens the state dict, plans one write per local
chunk and per value, and on the coordinator writes replicated items once with
the bytes balanced across ranks, then builds the metadata."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import operator
from typing import Any, NoReturn

import torch

from distcp.dtypes import dtype_name
from distcp.errors import CheckpointError, ShapeMismatchError, UnsupportedValueError
from distcp.flatten import Path, flatten_state_dict
from distcp.geometry import Box, find_overlap, find_overlap_of
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
    item_nbytes,
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
        self.storage_meta: StorageMeta | None = None
        self._tensors: dict[MetadataIndex, torch.Tensor] = {}
        self._values: dict[str, bytes] = {}
        # DCP's hooks: a subclass overriding either gets every item through them.
        cls = type(self)
        self._hooks_overridden = (
            cls.lookup_object is not DefaultSavePlanner.lookup_object
            or cls.transform_object is not DefaultSavePlanner.transform_object
        )

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
            data = plan.planner_data
            # A subclass may keep its own data there; most ranks add no new key.
            if isinstance(data, dict) and not data.keys() <= paths.keys():
                for key, path in data.items():
                    paths.setdefault(key, path)
            for item in plan.items:
                # Fast path: a chunk of a tensor already in ``state`` with the same
                # shape and dtype; anything else (and every error) in _add_to_metadata.
                tensor = item.tensor_data
                existing = state.get(item.index.fqn) if tensor is not None else None
                if (
                    type(existing) is TensorStorageMetadata
                    and tensor is not None
                    and existing.size == tensor.size
                    and existing.properties.dtype == tensor.properties.dtype
                ):
                    existing.chunks.append(tensor.chunk)
                else:
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
        """What storage writes for ``write_item``: ``transform_object(item,
        lookup_object(index))``, as in DCP; without overridden hooks, the tensor
        chunk or the value encoded while planning."""
        if self._hooks_overridden:
            return self.transform_object(write_item, self.lookup_object(write_item.index))
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._values[write_item.index.fqn])
        return self._tensors[write_item.index]

    def lookup_object(self, index: MetadataIndex) -> Any:
        """The state dict's object behind ``index``: this rank's chunk of a
        tensor at ``index.offset``, or the (flattened) value under ``index.fqn``."""
        tensor = self._tensors.get(index)
        if tensor is not None:
            return tensor
        if index.fqn not in self.state_dict:
            raise CheckpointError(f"key {index.fqn!r}: not in the state dict being saved")
        return self.state_dict[index.fqn]

    def transform_object(self, write_item: WriteItem, object: Any) -> torch.Tensor | io.BytesIO:
        """Turn a looked-up object into what storage writes: a value in the
        pickle-free encoding (DCP would ``torch.save`` it), a tensor as it is."""
        if write_item.type == WriteItemType.BYTE_IO:
            key = write_item.index.fqn
            return io.BytesIO(encode_value(object, key=key, allow_pickle=self.allow_pickle))
        if not isinstance(object, torch.Tensor):
            raise CheckpointError(
                f"key {write_item.index.fqn!r}: the planner resolved "
                f"{type(object).__name__} for a tensor item"
            )
        return object


_INDEX = operator.attrgetter("index")
_FQN = operator.attrgetter("fqn")
_OFFSET = operator.attrgetter("offset")


def _dedup_replicated(plans: list[SavePlan], *, balance: bool) -> list[SavePlan]:
    """Keep each item (same key and chunk offsets) in one rank's plan only.

    Values are kept on the lowest rank holding them. Tensor chunks go, largest
    first, to the rank holding them with the fewest bytes assigned so far, so
    replicated state is written once and its writing is shared out.

    Linear in the number of items, with the per-item work in C (``map``,
    ``dict``): each distinct item gets a number, and only the items on more
    than one rank (or twice on one) are looked at one by one.
    """
    items_of = [plan.items for plan in plans]
    keys_of = [_index_keys(items) for items in items_of]
    # Items are drawn numbers 0, 1, 2, ... in (rank, position) order, and each
    # distinct key keeps the number of its first occurrence: an item whose
    # number is not its own draw repeats an earlier one, which is then shared.
    numbers: dict[tuple[type, str, Any], int] = {}
    draws = itertools.count()
    numbers_of: list[list[int]] = []
    shared: set[int] = set()
    first_draw = 0
    for keys in keys_of:
        mine = list(map(numbers.setdefault, keys, draws))
        repeats = list(map(operator.ne, mine, range(first_draw, first_draw + len(mine))))
        if any(repeats):
            shared.update(itertools.compress(mine, repeats))
        numbers_of.append(mine)
        first_draw += len(mine)

    holders: dict[int, list[int]] = {}  # per shared item: the ranks holding it, ascending
    first_item: dict[int, WriteItem] = {}  # per shared item: the lowest rank's copy
    shared_at: list[list[int]] = []  # per rank: the positions of its shared items
    for rank, (items, mine) in enumerate(zip(items_of, numbers_of, strict=True)):
        positions = (
            []
            if shared.isdisjoint(mine)
            else [p for p, number in enumerate(mine) if number in shared]
        )
        shared_at.append(positions)
        for position in positions:
            number, item = mine[position], items[position]
            ranks = holders.setdefault(number, [])
            ranks.append(rank)
            reference = first_item.setdefault(number, item)
            if _differs(item, reference):
                raise ShapeMismatchError(
                    f"key {item.index.fqn!r}: rank {ranks[0]} and rank {rank} "
                    f"hold it with different shapes, dtypes or kinds "
                    f"({_describe(reference)} vs {_describe(item)})"
                )

    # An item on one rank is written by it; a shared one by the lowest rank
    # holding it unless it is a tensor chunk to balance.
    owner = {number: ranks[0] for number, ranks in holders.items()}
    replicated = [
        number for number in holders if balance and first_item[number].type != WriteItemType.BYTE_IO
    ]
    if replicated:
        _balance(replicated, holders, first_item, owner, items_of, numbers_of)
    return [
        dataclasses.replace(
            plan,
            items=_without(items, [p for p in positions if owner[mine[p]] != rank]),
        )
        for rank, (plan, items, mine, positions) in enumerate(
            zip(plans, items_of, numbers_of, shared_at, strict=True)
        )
    ]


def _differs(item: WriteItem, reference: WriteItem) -> bool:
    """``item.tensor_data != reference.tensor_data or item.type != reference.type``,
    with distcp's own dataclasses compared field by field (their ``__eq__``
    builds a tuple of fields at every level; a replicated model compares
    a million items)."""
    a, b = item.tensor_data, reference.tensor_data
    if (
        type(a) is TensorWriteData
        and type(b) is TensorWriteData
        and type(a.chunk) is ChunkStorageMetadata
        and type(b.chunk) is ChunkStorageMetadata
        and type(a.properties) is TensorProperties
        and type(b.properties) is TensorProperties
    ):
        pa, pb = a.properties, b.properties
        same = (
            a.chunk.offsets == b.chunk.offsets
            and a.chunk.sizes == b.chunk.sizes
            and pa.dtype == pb.dtype
            and pa.layout == pb.layout
            and pa.requires_grad == pb.requires_grad
            and pa.memory_format == pb.memory_format
            and pa.pin_memory == pb.pin_memory
            and a.size == b.size
        )
        return not same or item.type != reference.type
    return a != b or item.type != reference.type


def _without(items: list[WriteItem], drop: list[int]) -> list[WriteItem]:
    """A new list of ``items`` but those at the (ascending) positions ``drop``."""
    kept: list[WriteItem] = []
    start = 0
    for position in drop:
        kept += items[start:position]
        start = position + 1
    kept += items[start:]
    return kept


def _index_keys(items: list[WriteItem]) -> list[tuple[type, str, Any]]:
    """Per item, a key equal for two items exactly when their ``MetadataIndex``
    are (same class, fqn and offset; the ``index`` hint takes no part), and
    cheaper to hash than the index (no Python ``__hash__``)."""
    indices = list(map(_INDEX, items))
    return list(zip(map(type, indices), map(_FQN, indices), map(_OFFSET, indices), strict=True))


def _balance(
    replicated: list[int],
    holders: dict[int, list[int]],
    first_item: dict[int, WriteItem],
    owner: dict[int, int],
    items_of: list[list[WriteItem]],
    numbers_of: list[list[int]],
) -> None:
    """Give each replicated item, largest first, to the rank holding it with the
    fewest bytes assigned so far (ties to the lowest rank), updating ``owner``.

    Only the ranks holding a replicated item ever compete, so only their loads
    (the bytes of every other item they write) are counted.
    """
    balanced = set(replicated)
    loads: dict[int, int] = {}
    for rank in sorted(set(itertools.chain.from_iterable(holders[n] for n in replicated))):
        items, mine = items_of[rank], numbers_of[rank]
        loads[rank] = sum(
            _size(items[position]) for position, number in enumerate(mine) if number not in owner
        )
    for number, rank in owner.items():  # shared items with a fixed writer (values)
        if number not in balanced and rank in loads:
            loads[rank] += _size(first_item[number])
    sizes = {number: _size(first_item[number]) for number in replicated}
    # Largest first (a stable sort: equal sizes keep their order); ``min`` takes
    # the first least loaded holder, and holders ascend, so ties go to the lowest rank.
    replicated.sort(key=sizes.__getitem__, reverse=True)
    for number in replicated:
        rank = min(holders[number], key=loads.__getitem__)
        owner[number] = rank
        loads[rank] += sizes[number]


def _size(item: WriteItem) -> int:
    if type(item) is WriteItem and item.tensor_data is not None:
        # item_nbytes, without the call (a million items)
        data = item.tensor_data
        return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize
    return item_nbytes(item)


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


_OFFSETS = operator.attrgetter("offsets")
_SIZES = operator.attrgetter("sizes")


def _check_chunks(key: str, entry: TensorStorageMetadata) -> None:
    """The chunks the ranks hold must tile the tensor: no overlap, no gap.

    Sorts ``entry.chunks`` by offsets. Works on the chunks' tuples with C-level
    passes (no :class:`Box` per chunk) unless some chunk is not made of plain
    non-negative ints of one ndim; that case takes the Box path, whose errors
    it keeps.
    """
    chunks = entry.chunks
    if len(chunks) == 1 and chunks[0].sizes == entry.size and not any(chunks[0].offsets):
        return  # one piece, the whole tensor: the common case, settled at once
    offsets = _as_tuples(list(map(_OFFSETS, chunks)))
    order = sorted(range(len(chunks)), key=offsets.__getitem__)  # stable, like chunks.sort
    if order != list(range(len(chunks))):
        chunks[:] = [chunks[i] for i in order]
        offsets = [offsets[i] for i in order]
    sizes = _as_tuples(list(map(_SIZES, chunks)))
    if (
        not (_plain_fields(offsets) and _plain_fields(sizes))
        or len(set(map(len, offsets)) | set(map(len, sizes))) > 1
    ):
        boxes = [Box(o, s) for o, s in zip(offsets, sizes, strict=True)]
        overlap = find_overlap(boxes)
        if overlap is not None:
            _raise_overlap(key, boxes[overlap[0]], boxes[overlap[1]])
        covered = sum(box.numel for box in boxes)
    else:
        overlap = find_overlap_of(offsets, sizes)
        if overlap is not None:
            i, j = overlap
            _raise_overlap(key, Box(offsets[i], sizes[i]), Box(offsets[j], sizes[j]))
        covered = sum(map(math.prod, sizes))
    numel = Box.full(tuple(entry.size)).numel
    if covered != numel:
        raise CheckpointError(
            f"key {key!r}: the ranks' pieces cover {covered} of its {numel} "
            "elements; every element must be saved by some rank"
        )


def _as_tuples(fields: list[Any]) -> list[tuple[int, ...]]:
    """``fields`` as tuples: as they are when all are already tuples (a
    ``torch.Size`` is one), else each converted."""
    if set(map(type, fields)) <= {torch.Size, tuple}:
        return fields
    return list(map(tuple, fields))


def _plain_fields(fields: list[tuple[int, ...]]) -> bool:
    """Every entry a non-negative plain int (``Box`` would keep it as it is)."""
    values = list(itertools.chain.from_iterable(fields))
    return set(map(type, values)) <= {int} and min(values, default=0) >= 0


def _raise_overlap(key: str, a: Box, b: Box) -> NoReturn:
    raise CheckpointError(
        f"key {key!r}: ranks hold overlapping pieces {a} and {b} that are "
        "not the same replica; the sharding is inconsistent across ranks"
    )
