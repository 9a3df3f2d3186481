"""Where a rank's piece of a tensor sits in the global tensor.

A plain tensor is one chunk covering the whole tensor (the same key on several
ranks is a replicated tensor). A ShardedTensor has one box per local shard,
from its shard metadata (a rank may hold none, one or several).

A DTensor's local tensor is computed from its mesh coordinate and placements,
one tensor dimension at a time, walking the mesh dimensions left to right as
DTensor itself does (``distribute_tensor``, ``full_tensor``,
``compute_local_shape_and_global_offset``):

* ``Replicate()`` keeps the dimension as it is;
* ``Shard(d)`` splits the rank's current piece of dim ``d`` like
  ``torch.chunk`` and keeps part ``coordinate``;
* ``_StridedShard(d, split_factor=f)`` (FSDP2 on top of tensor parallel) first
  splits the current piece into ``f`` parts like ``torch.chunk``, splits each
  of those into ``mesh size`` parts, and keeps part ``coordinate`` of every one
  of them, concatenated in order.

So along each dim the local tensor is a concatenation of *runs*: ranges of
global indices, in increasing order. A plain ``Shard`` chain gives one run per
dim, hence one box; strided sharding may give several runs, and the local
tensor is then several boxes (the product of the runs of every dim), each
returned as a view into the local tensor so that loads land in place.

FSDP2 really cuts a tensor-parallel shard with ``torch.chunk`` again (nested
chunking), which is what ``_StridedShard`` means when the sizes divide evenly.
For some uneven sizes the two readings put different indices on some ranks;
such a layout is refused (naming the key) rather than saved under a guess.
An empty local piece is one empty box at offset ``shape[d]`` on its empty
dims, as PyTorch places empty shards, so it never takes the name (offsets) of
another rank's real chunk.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from distcp.errors import CheckpointError
from distcp.geometry import Box, contains, split_evenly

__all__ = ["LocalChunk", "TensorLayout", "is_distributed_tensor", "tensor_layout"]


@dataclass(frozen=True)
class LocalChunk:
    """One box of the global tensor and the local tensor (a view) holding it."""

    box: Box
    tensor: torch.Tensor


@dataclass(frozen=True)
class TensorLayout:
    """The global shape and dtype of a tensor value, and this rank's chunks of it."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[LocalChunk, ...]
    sharded: bool


Run = tuple[int, int]
"""``(global start, length)``: consecutive global indices along one dim."""

DimSharding = tuple[int, int]
"""How one mesh dim shards one tensor dim: ``(parts, split_factor)``, where
``parts`` is the mesh dim's size and ``split_factor`` is 0 for ``Shard`` and
the placement's split factor for ``_StridedShard``."""


def is_distributed_tensor(value: object) -> bool:
    return isinstance(value, (DTensor, ShardedTensor))


def tensor_layout(key: str, value: torch.Tensor) -> TensorLayout:
    """This rank's chunks of ``value`` (stored under ``key``, named in errors)."""
    if isinstance(value, DTensor):
        return _dtensor_layout(key, value)
    if isinstance(value, ShardedTensor):
        return _sharded_tensor_layout(key, value)
    if value.layout != torch.strided:
        raise CheckpointError(
            f"key {key!r}: {value.layout} tensors are not supported; convert with .to_dense()"
        )
    shape = tuple(value.shape)
    return TensorLayout(shape, value.dtype, (LocalChunk(Box.full(shape), value),), sharded=False)


# --------------------------------------------------------------------------- ShardedTensor


def _sharded_tensor_layout(key: str, value: ShardedTensor) -> TensorLayout:
    """One chunk per local shard (none on a rank that holds no shard), each
    checked against the shard's metadata and the global shape."""
    shape = tuple(value.size())
    chunks = []
    for shard in value.local_shards():
        box = Box(tuple(shard.metadata.shard_offsets), tuple(shard.metadata.shard_sizes))
        _check_not_meta(key, shard.tensor, "ShardedTensor shard")
        if tuple(shard.tensor.shape) != box.sizes:
            raise CheckpointError(
                f"key {key!r}: ShardedTensor shard at offsets {list(box.offsets)} has a tensor "
                f"of shape {list(shard.tensor.shape)}, its metadata says {list(box.sizes)}"
            )
        box = _normalise_empty(box, shape)
        if len(box.sizes) != len(shape) or not contains(Box.full(shape), box):
            raise CheckpointError(
                f"key {key!r}: ShardedTensor shard {box} lies outside the tensor's "
                f"shape {list(shape)}"
            )
        chunks.append(LocalChunk(box, shard.tensor))
    return TensorLayout(shape, value.dtype, tuple(chunks), sharded=True)


def _normalise_empty(box: Box, shape: tuple[int, ...]) -> Box:
    """An empty box moved to offset ``shape[d]`` on each of its zero-size dims,
    as PyTorch places empty DTensor shards. Nothing else can start there, so
    an empty piece never shares its offsets (its chunk's name) with a real
    piece of another rank. Non-empty boxes are returned as they are."""
    if not box.is_empty or len(shape) != box.ndim:
        return box
    offsets = tuple(
        size if length == 0 else offset
        for offset, length, size in zip(box.offsets, box.sizes, shape, strict=True)
    )
    return Box(offsets, box.sizes)


def _check_not_meta(key: str, tensor: torch.Tensor, what: str) -> None:
    if tensor.device.type == "meta":
        raise CheckpointError(
            f"key {key!r}: the {what} is on the meta device (it has no memory or data); "
            "materialize the model first, e.g. module.to_empty(device=...)"
        )


# --------------------------------------------------------------------------- DTensor


def _dtensor_layout(key: str, value: DTensor) -> TensorLayout:
    """The boxes of ``value``'s local tensor on this rank (none when the rank
    is not in the DTensor's mesh)."""
    mesh = value.device_mesh
    shape = tuple(value.shape)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the DTensor's mesh
        return TensorLayout(shape, value.dtype, (), sharded=True)
    shardings = _dim_shardings(key, shape, value.placements, tuple(mesh.shape))
    runs_per_dim = []
    for dim, size in enumerate(shape):
        mesh_dims = [mesh_dim for mesh_dim, _ in shardings[dim]]
        dim_shardings = tuple(sharding for _, sharding in shardings[dim])
        if any(split_factor for _, split_factor in dim_shardings):
            _check_unambiguous(key, value, dim, size, dim_shardings)
        indices = tuple(coordinate[mesh_dim] for mesh_dim in mesh_dims)
        runs_per_dim.append(runs_left_to_right(size, dim_shardings, indices))
    local = value.to_local()
    _check_not_meta(key, local, "DTensor's local tensor")
    expected = [sum(length for _, length in runs) for runs in runs_per_dim]
    if list(local.shape) != expected:
        raise CheckpointError(
            f"key {key!r}: DTensor local shape {tuple(local.shape)} does not match the "
            f"expected shard {expected} of {list(shape)} for placements {value.placements}"
        )
    chunks = _chunks_of(local, shape, runs_per_dim)
    return TensorLayout(shape, value.dtype, chunks, sharded=True)


def _dim_shardings(
    key: str, shape: tuple[int, ...], placements: Sequence[Placement], mesh_shape: tuple[int, ...]
) -> list[list[tuple[int, DimSharding]]]:
    """Per tensor dim, the mesh dims that shard it, in mesh order, as
    ``(mesh_dim, (parts, split_factor))``. Refuses ``Partial`` and any
    placement this module does not know."""
    shardings: list[list[tuple[int, DimSharding]]] = [[] for _ in shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, _StridedShard):
            split_factor = int(placement.split_factor)
            if split_factor < 1:
                raise CheckpointError(f"key {key!r}: invalid DTensor placement {placement!r}")
        elif type(placement) is Shard:
            split_factor = 0
        else:
            raise CheckpointError(_unsupported_placement(key, placement))
        dim = placement.dim + len(shape) if placement.dim < 0 else placement.dim
        if not 0 <= dim < len(shape):
            raise CheckpointError(
                f"key {key!r}: DTensor placement {placement} does not fit a tensor of "
                f"shape {list(shape)}"
            )
        shardings[dim].append((mesh_dim, (mesh_shape[mesh_dim], split_factor)))
    return shardings


def _unsupported_placement(key: str, placement: Placement) -> str:
    if isinstance(placement, Partial):
        return (
            f"key {key!r}: DTensor placement {placement!r} holds partial results (each rank "
            "a term of a reduction), not values; reduce it before saving or loading, e.g. "
            "dtensor.redistribute(placements=[Replicate() or Shard(d) ...])"
        )
    return (
        f"key {key!r}: DTensor placement {placement!r} is not supported (only Shard, "
        "_StridedShard and Replicate are); redistribute to Shard/Replicate first"
    )


def _chunks_of(
    local: torch.Tensor, shape: tuple[int, ...], runs_per_dim: Sequence[tuple[Run, ...]]
) -> tuple[LocalChunk, ...]:
    """One chunk per box of the local tensor: the product of the runs of every
    dim, each a view (``narrow``) into ``local``. An empty local tensor is one
    empty chunk, placed as :func:`_normalise_empty` says."""
    if any(not runs for runs in runs_per_dim):
        offsets = tuple(runs[0][0] if runs else 0 for runs in runs_per_dim)
        return (LocalChunk(_normalise_empty(Box(offsets, tuple(local.shape)), shape), local),)
    placed = [_with_local_starts(runs) for runs in runs_per_dim]
    chunks = []
    for combination in itertools.product(*placed):
        view = local
        for dim, (local_start, _, length) in enumerate(combination):
            if length != local.shape[dim]:
                view = view.narrow(dim, local_start, length)
        box = Box(
            tuple(start for _, start, _ in combination),
            tuple(length for _, _, length in combination),
        )
        chunks.append(LocalChunk(box, view))
    return tuple(chunks)


def _with_local_starts(runs: tuple[Run, ...]) -> list[tuple[int, int, int]]:
    """``(local start, global start, length)`` of each run: runs follow each
    other in the local tensor."""
    placed = []
    local_start = 0
    for start, length in runs:
        placed.append((local_start, start, length))
        local_start += length
    return placed


# --------------------------------------------------------------------------- runs


def _slice_runs(runs: Sequence[Run], start: int, length: int) -> list[Run]:
    """The runs holding local positions ``[start, start + length)`` of the
    concatenation of ``runs``."""
    out: list[Run] = []
    position = 0
    end = start + length
    for run_start, run_length in runs:
        lo = max(start, position)
        hi = min(end, position + run_length)
        if lo < hi:
            out.append((run_start + lo - position, hi - lo))
        position += run_length
    return out


def _merge_runs(runs: Sequence[Run]) -> tuple[Run, ...]:
    """Adjacent runs joined, so a contiguous range is always a single run."""
    merged: list[Run] = []
    for start, length in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((start, length))
    return tuple(merged)


def _apply(runs: Sequence[Run], sharding: DimSharding, index: int) -> list[Run]:
    """Part ``index`` of ``runs`` under one mesh dim's sharding: ``Shard``
    when the split factor is 0, ``_StridedShard`` otherwise (see the module
    docstring)."""
    parts, split_factor = sharding
    total = sum(length for _, length in runs)
    if not split_factor:
        return _slice_runs(runs, *split_evenly(total, parts, index))
    out: list[Run] = []
    for piece in range(split_factor):
        piece_start, piece_length = split_evenly(total, split_factor, piece)
        start, length = split_evenly(piece_length, parts, index)
        out.extend(_slice_runs(runs, piece_start + start, length))
    return out


@functools.lru_cache(maxsize=4096)
def runs_left_to_right(
    size: int, shardings: tuple[DimSharding, ...], indices: tuple[int, ...]
) -> tuple[Run, ...]:
    """The runs of global indices, in local order, that a rank with mesh
    coordinates ``indices`` holds of a dim of ``size`` sharded by
    ``shardings`` (mesh order): DTensor's own semantics. Empty runs are
    dropped, so an empty piece is ``()``."""
    runs: list[Run] = [(0, size)] if size else []
    for sharding, index in zip(shardings, indices, strict=True):
        runs = _apply(runs, sharding, index)
    return _merge_runs(runs)


def nested_order(shardings: tuple[DimSharding, ...]) -> tuple[int, ...] | None:
    """The order in which FSDP2 really applies ``shardings`` (positions into
    it), or None when they are not FSDP2's pattern.

    ``_StridedShard(d, split_factor=f)`` says "this mesh dim sharded dim ``d``
    *after* the mesh dims to its right that shard ``d``, whose sizes multiply
    to ``f``" (``fully_shard`` chunks each tensor-parallel piece). Walking
    right to left, a plain shard goes before the ones already placed, a
    strided one whose factor matches goes after them all.
    """
    order: list[int] = []
    later_parts = 1
    for position in range(len(shardings) - 1, -1, -1):
        parts, split_factor = shardings[position]
        if not split_factor:
            order.insert(0, position)
        elif split_factor == later_parts:
            order.append(position)
        else:
            return None
        later_parts *= parts
    return tuple(order)


def runs_nested(
    size: int, shardings: tuple[DimSharding, ...], indices: tuple[int, ...], order: Sequence[int]
) -> tuple[Run, ...]:
    """The runs a rank holds when every sharding is a plain ``torch.chunk``
    applied in ``order`` (positions into ``shardings``): how FSDP2 over tensor
    parallel really cuts the tensor."""
    runs: list[Run] = [(0, size)] if size else []
    for position in order:
        runs = _apply(runs, (shardings[position][0], 0), indices[position])
    return _merge_runs(runs)


@functools.lru_cache(maxsize=1024)
def is_ambiguous(size: int, shardings: tuple[DimSharding, ...]) -> bool:
    """True when DTensor's left-to-right reading of strided ``shardings`` and
    FSDP2's nested chunking give some rank different indices of a dim of
    ``size``. They agree whenever the sizes divide evenly, and often
    otherwise; where they do not, the same placements describe two different
    layouts and a checkpoint cannot know which one the data follows."""
    order = nested_order(shardings)
    if order is None:
        return False
    for indices in itertools.product(*(range(parts) for parts, _ in shardings)):
        if runs_left_to_right(size, shardings, indices) != runs_nested(
            size, shardings, indices, order
        ):
            return True
    return False


def _check_unambiguous(
    key: str, value: DTensor, dim: int, size: int, shardings: tuple[DimSharding, ...]
) -> None:
    if is_ambiguous(size, shardings):
        divisor = 1
        for parts, _ in shardings:
            divisor *= parts
        raise CheckpointError(
            f"key {key!r}: DTensor placements {value.placements} on mesh "
            f"{tuple(value.device_mesh.shape)} shard dim {dim} (size {size}) unevenly, and for "
            "this size DTensor's reading of strided sharding (distribute_tensor, full_tensor) "
            "and FSDP2's (fully_shard over tensor parallel) put different indices on some "
            "ranks, so the layout is ambiguous. Make that dim a multiple of "
            f"{divisor}, or save and load it as Shard/Replicate"
        )
