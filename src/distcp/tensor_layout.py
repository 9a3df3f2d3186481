"""Where a rank's piece of a tensor sits in the global tensor.

A plain tensor is one chunk covering the whole tensor (the same key on several
ranks is a replicated tensor). A DTensor's local tensor is one box computed from
its mesh coordinate and placements (``Shard(d)`` splits like ``torch.chunk``;
``Replicate()`` keeps the dimension whole). A ShardedTensor has one box per
local shard, from its shard metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from distcp.errors import CheckpointError
from distcp.geometry import Box, split_evenly

__all__ = ["LocalChunk", "TensorLayout", "is_distributed_tensor", "tensor_layout"]


@dataclass(frozen=True)
class LocalChunk:
    box: Box
    tensor: torch.Tensor


@dataclass(frozen=True)
class TensorLayout:
    """The global shape and dtype of a tensor value, and this rank's chunks of it."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[LocalChunk, ...]
    sharded: bool


def is_distributed_tensor(value: object) -> bool:
    return isinstance(value, (DTensor, ShardedTensor))


def tensor_layout(key: str, value: torch.Tensor) -> TensorLayout:
    """This rank's chunks of ``value`` (stored under ``key``, named in errors)."""
    if isinstance(value, DTensor):
        return _dtensor_layout(key, value)
    if isinstance(value, ShardedTensor):
        shape = tuple(value.size())
        chunks = tuple(
            LocalChunk(
                Box(tuple(shard.metadata.shard_offsets), tuple(shard.metadata.shard_sizes)),
                shard.tensor,
            )
            for shard in value.local_shards()
        )
        return TensorLayout(shape, value.dtype, chunks, sharded=True)
    if value.layout != torch.strided:
        raise CheckpointError(
            f"key {key!r}: {value.layout} tensors are not supported; convert with .to_dense()"
        )
    shape = tuple(value.shape)
    return TensorLayout(shape, value.dtype, (LocalChunk(Box.full(shape), value),), sharded=False)


def _dtensor_layout(key: str, value: DTensor) -> TensorLayout:
    mesh = value.device_mesh
    shape = tuple(value.shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the DTensor's mesh
        return TensorLayout(shape, value.dtype, (), sharded=True)
    offsets = [0] * len(shape)
    sizes = list(shape)
    for mesh_dim, placement in enumerate(value.placements):
        if isinstance(placement, Shard) and type(placement) is Shard:
            dim = placement.dim
            offset, length = split_evenly(sizes[dim], mesh.size(mesh_dim), coordinate[mesh_dim])
            offsets[dim] += offset
            sizes[dim] = length
        elif not isinstance(placement, Replicate):
            raise CheckpointError(
                f"key {key!r}: DTensor placement {placement} is not supported yet "
                "(Partial must be reduced; strided sharding is handled by redistributing "
                "to Shard/Replicate first)"
            )
    local = value.to_local()
    if tuple(local.shape) != tuple(sizes):
        raise CheckpointError(
            f"key {key!r}: DTensor local shape {tuple(local.shape)} does not match the "
            f"expected shard {sizes} of {list(shape)} for placements {value.placements}"
        )
    box = Box(tuple(offsets), tuple(sizes))
    return TensorLayout(shape, value.dtype, (LocalChunk(box, local),), sharded=True)
