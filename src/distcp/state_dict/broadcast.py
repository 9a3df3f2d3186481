"""Rank 0's full state dict, sent to every rank one tensor at a time.

Rank 0 first broadcasts the skeleton (the nested containers and non-tensor
values, each tensor replaced by its shape and dtype); then every rank walks the
skeleton in the same order, receives each tensor and immediately hands it to a
``keep`` function that returns what this rank stores (its shard), so no rank
holds more than one full tensor beyond what it keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distcp.errors import CheckpointError
from distcp.state_dict.full_tensors import collective_device, is_sharded
from distcp.state_dict.tree import Path, map_leaves

__all__ = ["broadcast_from_rank0"]


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Failure:
    message: str


def broadcast_from_rank0(tree: Any, keep: Callable[[Path, torch.Tensor], Any], *, what: str) -> Any:
    """Every rank gets rank 0's ``tree``, each tensor ``t`` at ``path`` replaced
    by ``keep(path, t)``. ``tree`` is ignored on other ranks. Every rank of the
    default group calls this."""
    if not (dist.is_available() and dist.is_initialized()):
        return map_leaves(tree, lambda path, leaf: _keep_local(keep, path, leaf, what))
    rank = dist.get_rank()
    skeleton = _broadcast_skeleton(tree if rank == 0 else None, what)
    device = collective_device()

    def receive(path: Path, leaf: Any) -> Any:
        if not isinstance(leaf, _TensorSpec):
            return leaf
        if rank == 0:
            buffer = _leaf_at(tree, path).detach().to(device).contiguous()
        else:
            buffer = torch.empty(leaf.shape, dtype=leaf.dtype, device=device)
        dist.broadcast(buffer, src=0)
        return keep(path, buffer)

    return map_leaves(skeleton, receive)


def _broadcast_skeleton(tree: Any, what: str) -> Any:
    """Rank 0's skeleton on every rank; an error in it is raised on every rank
    (rather than leaving the other ranks waiting for rank 0)."""
    box: list[Any] = [None]
    error: CheckpointError | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = map_leaves(tree, lambda path, leaf: _spec(path, leaf, what))
        except CheckpointError as caught:
            error = caught
            box[0] = _Failure(str(caught))
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if isinstance(box[0], _Failure):
        raise CheckpointError(f"on rank 0: {box[0].message}")
    return box[0]


def _keep_local(keep: Callable[[Path, torch.Tensor], Any], path: Path, leaf: Any, what: str) -> Any:
    _spec(path, leaf, what)
    return keep(path, leaf) if isinstance(leaf, torch.Tensor) else leaf


def _spec(path: Path, leaf: Any, what: str) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return leaf
    if is_sharded(leaf):
        raise CheckpointError(
            f"{what} key {'.'.join(map(str, path))!r}: broadcast_from_rank0 needs full (plain) "
            f"tensors on rank 0, got a {type(leaf).__name__}"
        )
    return _TensorSpec(tuple(leaf.shape), leaf.dtype)


def _leaf_at(tree: Any, path: Path) -> torch.Tensor:
    for part in path:
        tree = tree[part]
    assert isinstance(tree, torch.Tensor)
    return tree
