"""``DefaultLoadPlanner``: matches the caller's (flattened) state dict against
the checkpoint's metadata and plans, for each local chunk of each requested
tensor, a read of every saved chunk that overlaps it."""

from __future__ import annotations

import io
from typing import Any

import torch

from distcp.dtypes import is_lossless_cast
from distcp.errors import (
    CheckpointError,
    CheckpointFormatError,
    DtypeMismatchError,
    KeyMismatchError,
    ShapeMismatchError,
)
from distcp.flatten import Path, flatten_state_dict, set_at_path
from distcp.geometry import Box, intersect
from distcp.metadata import (
    STATE_DICT_TYPE,
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from distcp.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from distcp.tensor_layout import tensor_layout
from distcp.value_codec import decode_value

__all__ = ["DefaultLoadPlanner"]


class DefaultLoadPlanner(LoadPlanner):
    """The load planner ``distcp.load`` uses unless given another.

    Args:
        flatten_state_dict: flatten nested containers to dotted keys, as on save.
        flatten_sharded_tensors: accepted for DCP compatibility (always on).
        allow_partial_load: skip requested keys the checkpoint lacks instead of
            raising :class:`KeyMismatchError`.
        allow_dtype_cast: also allow lossy casts (fp32 checkpoint → bf16 model);
            lossless widening (bf16 → fp32, int8 → int32, …) is always allowed.
        allow_pickle: load values that were saved with pickle. Only for
            checkpoints you trust: unpickling runs code.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool = False,
        *,
        allow_dtype_cast: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        self.flatten_state_dict = flatten_state_dict
        self.flatten_sharded_tensors = flatten_sharded_tensors
        self.allow_partial_load = allow_partial_load
        self.allow_dtype_cast = allow_dtype_cast
        self.allow_pickle = allow_pickle
        self.original_state_dict: STATE_DICT_TYPE = {}
        self.state_dict: dict[str, Any] = {}
        self.paths: dict[str, Path] = {}
        self.metadata: Metadata | None = None
        self.is_coordinator = False
        self._destinations: dict[MetadataIndex, torch.Tensor] = {}

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.original_state_dict = state_dict
        if self.flatten_state_dict:
            self.state_dict, self.paths = flatten_state_dict(state_dict)
        else:
            self.state_dict = dict(state_dict)
            self.paths = {key: (key,) for key in state_dict}
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise CheckpointError("create_local_plan called before set_up_planner(metadata)")
        saved = self.metadata.state_dict_metadata
        missing = [key for key in self.state_dict if key not in saved]
        if missing and not self.allow_partial_load:
            raise KeyMismatchError(
                missing,
                hint="Load a subset with DefaultLoadPlanner(allow_partial_load=True), or check "
                f"the key names (the checkpoint has {len(saved)} keys, e.g. "
                f"{sorted(saved)[:5]})",
            )
        items: list[ReadItem] = []
        self._destinations.clear()
        for key, value in self.state_dict.items():
            entry = saved.get(key)
            if entry is None:
                continue
            if isinstance(entry, BytesStorageMetadata):
                items.append(_bytes_item(key))
            elif isinstance(value, torch.Tensor):
                items.extend(self._tensor_items(key, value, entry))
            else:
                # A non-tensor placeholder for a saved tensor: load the whole tensor.
                full = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
                self.state_dict[key] = full
                set_at_path(self.original_state_dict, self.paths[key], full)
                items.extend(self._tensor_items(key, full, entry))
        return LoadPlan(items)

    def _tensor_items(
        self, key: str, value: torch.Tensor, entry: TensorStorageMetadata
    ) -> list[ReadItem]:
        if value.device.type == "meta":
            raise CheckpointError(
                f"key {key!r}: cannot load into a meta tensor (it has no memory); materialize "
                "the model first, e.g. module.to_empty(device=...)"
            )
        layout = tensor_layout(key, value)
        if layout.global_shape != tuple(entry.size):
            raise ShapeMismatchError(
                f"key {key!r}: Size mismatch between the saved shape {list(entry.size)} and "
                f"the shape the state dict asks for, {list(layout.global_shape)}"
            )
        saved_dtype = entry.properties.dtype
        if not (is_lossless_cast(saved_dtype, layout.dtype) or self.allow_dtype_cast):
            raise DtypeMismatchError(
                f"key {key!r}: the checkpoint has {saved_dtype}, the state dict asks for "
                f"{layout.dtype}, and the cast loses precision; pass "
                "DefaultLoadPlanner(allow_dtype_cast=True) to cast anyway"
            )
        saved_boxes = [Box(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        items = []
        for chunk in layout.chunks:
            self._destinations[MetadataIndex(key, chunk.box.offsets)] = chunk.tensor
            for saved_box in saved_boxes:
                if saved_box == chunk.box and not (saved_box.is_empty and saved_box.ndim):
                    # loaded as saved: the whole chunk, nothing to cut
                    zeros = torch.Size((0,) * saved_box.ndim)
                    dest_offsets, storage_offsets = zeros, zeros
                    lengths = torch.Size(saved_box.sizes)
                else:
                    overlap = intersect(chunk.box, saved_box)
                    if overlap is None or (overlap.is_empty and chunk.box.ndim):
                        continue
                    dest_offsets = torch.Size(overlap.relative_to(chunk.box).offsets)
                    storage_offsets = torch.Size(overlap.relative_to(saved_box).offsets)
                    lengths = torch.Size(overlap.sizes)
                items.append(
                    ReadItem(
                        type=LoadItemType.TENSOR,
                        dest_index=MetadataIndex(key, chunk.box.offsets),
                        dest_offsets=dest_offsets,
                        storage_index=MetadataIndex(key, saved_box.offsets),
                        storage_offsets=storage_offsets,
                        lengths=lengths,
                    )
                )
        return items

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        data = value.getbuffer()
        if bytes(data[:4]) == TORCH_SAVE_MAGIC:
            decoded = _torch_load_safely(value, key)  # a torch DCP planner's value
        else:
            decoded = decode_value(data, key=key, allow_pickle=self.allow_pickle)
        self.state_dict[key] = decoded
        set_at_path(self.original_state_dict, self.paths[key], decoded)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The tensor storage fills: ``transform_tensor(item,
        lookup_tensor(dest_index))``, as in DCP."""
        return self.transform_tensor(read_item, self.lookup_tensor(read_item.dest_index))

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        """This rank's destination chunk at ``index`` (a plain tensor, or a
        DTensor's / ShardedTensor's local piece)."""
        destination = self._destinations.get(index)
        if destination is None:
            raise CheckpointError(
                f"key {index.fqn!r}: no destination chunk at offsets "
                f"{list(index.offset or ())} in the state dict being loaded"
            )
        return destination.detach()

    def transform_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> torch.Tensor:
        """The view of ``tensor`` that ``read_item`` fills (its ``dest_offsets``
        and ``lengths``)."""
        if read_item.lengths == tensor.shape and not any(read_item.dest_offsets):
            return tensor  # the whole destination
        for dim, (offset, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            tensor = tensor.narrow(dim, offset, length)
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """Nothing to do: the reader wrote straight into the view that
        ``resolve_tensor`` returned. A custom planner that resolves to a
        staging tensor copies it into place here."""


TORCH_SAVE_MAGIC = b"PK\x03\x04"
"""How a ``torch.save`` archive starts (a zip), as torch DCP's planners write
values; distcp's value encoding never starts so (a msgpack stream starting
with the integer 80 has nothing after it)."""


def _torch_load_safely(value: io.BytesIO, key: str) -> object:
    """A value torch DCP's planner saved, loaded with ``weights_only=True``:
    tensors, containers and primitive types only, never arbitrary code."""
    value.seek(0)
    try:
        return torch.load(value, weights_only=True)
    except Exception as error:
        raise CheckpointFormatError(
            f"key {key!r}: the value was saved by torch DCP (torch.save) and holds something "
            f"torch.load(weights_only=True) refuses, so distcp will not load it: {error}"
        ) from error


def _bytes_item(key: str) -> ReadItem:
    index = MetadataIndex(key)
    zero = torch.Size([0])
    return ReadItem(LoadItemType.BYTE_IO, index, zero, index, zero, zero)
