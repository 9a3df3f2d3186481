"""``DynamicMetaLoadPlanner``: loads from a source that has no metadata file
(a ``torch.save`` file) by describing the source with the state dict itself.

Every tensor of the state dict is taken to be saved whole, with its global
shape and dtype, and every other value as a value; the load then plans, for
each local shard (a DTensor's, too), the part of that whole tensor it needs.
What the source really holds (missing keys, other shapes or dtypes) is checked
by the storage reader once it has the source open:
:class:`~distcp.convert.torch_save_reader.BroadcastingTorchSaveReader`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import (
    STATE_DICT_TYPE,
    STORAGE_TYPES,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.planner import LoadPlan
from distcp.tensor_layout import tensor_layout

__all__ = ["DynamicMetaLoadPlanner", "DynamicPlanData"]


@dataclass(frozen=True)
class DynamicPlanData:
    """What a :class:`DynamicMetaLoadPlanner` tells the storage reader in each
    local plan's ``planner_data``: whether keys the source lacks may be skipped."""

    allow_partial_load: bool


class DynamicMetaLoadPlanner(DefaultLoadPlanner):
    """A :class:`~distcp.DefaultLoadPlanner` that builds the checkpoint's
    metadata from the state dict being loaded instead of reading it (torch
    DCP's ``DynamicMetaLoadPlanner``; use it with ``BroadcastingTorchSaveReader``).

    Unlike torch DCP's, non-tensor values (ints, strings, containers) load too.

    Args:
        flatten_state_dict: flatten nested containers to dotted keys, as on save.
        flatten_sharded_tensors: accepted for DCP compatibility (always on).
        allow_partial_load: skip keys the source lacks instead of raising
            :class:`~distcp.KeyMismatchError`.
        allow_dtype_cast: also allow lossy casts from the source's dtypes.
    """

    def __init__(
        self,
        flatten_state_dict: bool = True,
        flatten_sharded_tensors: bool = True,
        allow_partial_load: bool = False,
        *,
        allow_dtype_cast: bool = False,
    ) -> None:
        super().__init__(
            flatten_state_dict,
            flatten_sharded_tensors,
            allow_partial_load,
            allow_dtype_cast=allow_dtype_cast,
        )

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        entries: dict[str, STORAGE_TYPES] = {}
        for key, value in self.state_dict.items():
            if isinstance(value, torch.Tensor):
                layout = tensor_layout(key, value)
                shape = torch.Size(layout.global_shape)
                whole = ChunkStorageMetadata(torch.Size([0] * len(shape)), shape)
                entries[key] = TensorStorageMetadata(
                    TensorProperties(dtype=layout.dtype), shape, [whole]
                )
            else:
                entries[key] = BytesStorageMetadata()
        paths = {key: list(path) for key, path in self.paths.items()}
        self.metadata = Metadata(state_dict_metadata=entries, planner_data=paths)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        return dataclasses.replace(plan, planner_data=DynamicPlanData(self.allow_partial_load))
