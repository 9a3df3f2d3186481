"""The planner interfaces and the plan vocabulary: torch DCP's own classes.

A planner decides *what* is written or read; storage decides *where* the bytes
go. ``SavePlanner``, ``WriteItem``, ``WriteItemType`` and the rest are
``torch.distributed.checkpoint.planner``'s classes themselves, so a planner
written for torch DCP (torch's ``DefaultSavePlanner`` included) and distcp's
planners and storage speak the same types: an enum member or a dataclass from
one library is the same object in the other. The call order each planner can
rely on is written in ``api.py``.
"""

from __future__ import annotations

import math

from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = [
    "BytesIOWriteData",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "ReadItem",
    "SavePlan",
    "SavePlanner",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
    "item_nbytes",
]


def item_nbytes(item: WriteItem) -> int:
    """The bytes ``item`` writes: its chunk's for a tensor (torch's
    ``WriteItem.tensor_storage_size`` counts the whole tensor's), the value's
    for a ``BYTE_IO`` item (0 where the plan does not say)."""
    data = item.tensor_data
    if data is not None:
        return math.prod(data.chunk.sizes) * data.properties.dtype.itemsize
    return item.bytes_io_data.nbytes if item.bytes_io_data is not None else 0
