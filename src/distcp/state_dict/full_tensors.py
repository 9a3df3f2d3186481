"""Between a rank's piece of a tensor and the full tensor, one tensor at a time.

``full_tensor`` gathers a DTensor or ShardedTensor into a plain tensor on every
rank; ``shard_like`` cuts, from a full tensor every rank holds, this rank's
piece in the layout of a given DTensor or ShardedTensor (no communication for
DTensors; one metadata exchange for ShardedTensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import init_from_local_shards
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed._shard.sharded_tensor.shard import Shard as LocalShard
from torch.distributed.tensor import DTensor, distribute_tensor

from distcp.errors import ShapeMismatchError

__all__ = ["collective_device", "full_tensor", "global_shape", "is_sharded", "shard_like"]


def is_sharded(value: object) -> bool:
    return isinstance(value, (DTensor, ShardedTensor))


def global_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.size())


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole of ``value`` on every rank: a DTensor or ShardedTensor is
    gathered (a collective: every rank of its group calls this); a plain tensor
    is returned as it is."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, ShardedTensor):
        return _gather_sharded_tensor(value)
    return value


def _gather_sharded_tensor(value: ShardedTensor) -> torch.Tensor:
    """Each shard is broadcast by the rank that holds it and copied into place."""
    local = {tuple(s.metadata.shard_offsets): s.tensor for s in value.local_shards()}
    device = next(iter(local.values())).device if local else collective_device()
    full = torch.empty(tuple(value.size()), dtype=value.dtype, device=device)
    group = _process_group(value)
    me = dist.get_rank()
    for shard in value.metadata().shards_metadata:
        offsets, sizes = tuple(shard.shard_offsets), tuple(shard.shard_sizes)
        owner = shard.placement.rank() if shard.placement is not None else 0
        piece = local.get(offsets) if owner == me else None
        if piece is None:
            piece = torch.empty(sizes, dtype=value.dtype, device=device)
        piece = piece.contiguous()
        dist.broadcast(piece, src=owner, group=group)
        _region(full, offsets, sizes).copy_(piece)
    return full


def shard_like(key: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` in the layout of ``like`` (a DTensor or
    ShardedTensor; a plain ``like`` gives ``full`` back). Raises
    :class:`ShapeMismatchError` naming ``key`` if the global shapes differ."""
    if tuple(full.shape) != global_shape(like):
        raise ShapeMismatchError(
            f"key {key!r}: the state dict has shape {list(full.shape)}, the model expects "
            f"{list(global_shape(like))}"
        )
    if isinstance(like, DTensor):
        local_device = like.to_local().device
        return distribute_tensor(
            full.detach().to(local_device), like.device_mesh, like.placements, src_data_rank=None
        )
    if isinstance(like, ShardedTensor):
        return _sharded_tensor_like(full.detach(), like)
    return full


def _sharded_tensor_like(full: torch.Tensor, like: ShardedTensor) -> ShardedTensor:
    shards = [
        LocalShard.from_tensor_and_offsets(
            _region(full, tuple(s.metadata.shard_offsets), tuple(s.metadata.shard_sizes))
            .to(s.tensor.device)
            .clone(),
            list(s.metadata.shard_offsets),
            dist.get_rank(),
        )
        for s in like.local_shards()
    ]
    return init_from_local_shards(shards, *like.size(), process_group=_process_group(like))


def _region(tensor: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    for dim, (offset, size) in enumerate(zip(offsets, sizes, strict=True)):
        tensor = tensor.narrow(dim, offset, size)
    return tensor


def _process_group(value: ShardedTensor) -> dist.ProcessGroup | None:
    # ShardedTensor keeps its group in an attribute without a public accessor;
    # FSDP1 with HYBRID_SHARD shards over a group smaller than the world.
    group: dist.ProcessGroup | None = getattr(value, "_process_group", None)
    return group


def collective_device() -> torch.device:
    """Where tensors for a collective on the default group must live."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
