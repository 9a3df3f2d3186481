"""Staging: a snapshot of a state dict in reusable host buffers.

``async_save`` returns once the state is staged; training may then change its
tensors while the snapshot is written. Buffers are kept per key and reused by
the next save of the same structure (same key, shape, dtype), so repeated
saves allocate nothing; a key whose shape or dtype changed gets a new buffer
and buffers of keys that disappeared are released. CUDA tensors are staged
into pinned host memory with asynchronous copies, synchronised once.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed._shard.sharded_tensor.shard import Shard as ShardedTensorShard
from torch.distributed.tensor import DTensor

from distcp.metadata import STATE_DICT_TYPE

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """Host buffers for snapshots of one state-dict structure, reused across saves."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0  # buffers ever allocated (a reuse check for tests)
        self.staged_bytes = 0  # bytes copied by the last stage()

    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        """A copy of ``state_dict`` whose tensors live in this object's buffers
        (same types: DTensor stays DTensor, ShardedTensor stays ShardedTensor)
        and whose other values are deep copies."""
        used: dict[str, torch.Tensor] = {}
        self.staged_bytes = 0
        cuda_copies = False

        def host_copy(path: str, tensor: torch.Tensor) -> torch.Tensor:
            nonlocal cuda_copies
            tensor = tensor.detach()
            buffer = self._buffer(path, tensor)
            used[path] = buffer
            source = tensor.resolve_conj().resolve_neg()
            buffer.copy_(source, non_blocking=tensor.is_cuda)
            cuda_copies |= tensor.is_cuda
            self.staged_bytes += buffer.numel() * buffer.element_size()
            return buffer

        def stage_value(path: str, value: Any) -> Any:
            if isinstance(value, DTensor):
                local = host_copy(path, value.to_local())
                return DTensor.from_local(
                    local,
                    value.device_mesh,
                    value.placements,
                    run_check=False,
                    shape=value.shape,
                    stride=value.stride(),
                )
            if isinstance(value, ShardedTensor):
                shards = [
                    ShardedTensorShard(host_copy(f"{path}#{n}", shard.tensor), shard.metadata)
                    for n, shard in enumerate(value.local_shards())
                ]
                return ShardedTensor._init_from_local_shards_and_global_metadata(
                    shards, value.metadata(), process_group=value._process_group
                )
            if isinstance(value, torch.Tensor):
                return host_copy(path, value)
            if isinstance(value, Mapping):
                return type(value)(  # type: ignore[call-arg]
                    {k: stage_value(f"{path}.{k}", v) for k, v in value.items()}
                )
            if isinstance(value, list):
                return [stage_value(f"{path}.{n}", v) for n, v in enumerate(value)]
            return copy.deepcopy(value)

        staged = {key: stage_value(key, value) for key, value in state_dict.items()}
        if cuda_copies:
            torch.cuda.synchronize()
        self._buffers = used  # buffers of keys no longer saved are released
        return staged

    def _buffer(self, path: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype:
            return buffer
        self.allocations += 1
        return torch.empty(
            tensor.shape,
            dtype=tensor.dtype,
            pin_memory=tensor.is_cuda and torch.cuda.is_available(),
        )
