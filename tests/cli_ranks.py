"""Rank functions for tests/test_cli.py (module-level, so spawned ranks import them)."""

from __future__ import annotations

import torch

import distcp


def full_weight() -> torch.Tensor:
    return torch.arange(16 * 12, dtype=torch.float32).reshape(16, 12) / 7


def save_sharded(rank: int, world_size: int, path: str) -> None:
    """A Shard(0) DTensor, a replicated tensor and a value, on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {
        "model": {
            "w": distribute_tensor(full_weight(), mesh, [Shard(0)]),
            "bias": torch.ones(12, dtype=torch.bfloat16),
        },
        "step": 42,
    }
    distcp.save(state, checkpoint_id=path)


def load_safetensors_sharded(rank: int, world_size: int, folder: str) -> dict[str, int]:
    """Load a safetensors folder straight into Shard(1) DTensors; return
    what this rank needed and read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    target = distribute_tensor(torch.zeros(16, 12), mesh, [Shard(1)])
    state = {"w": target, "bias": torch.zeros(12, dtype=torch.bfloat16)}
    reader = distcp.SafetensorsReader(folder)
    distcp.load(state, storage_reader=reader)
    expected = full_weight().chunk(world_size, 1)[rank]
    assert torch.equal(state["w"].to_local(), expected), f"rank {rank}"
    assert torch.equal(state["bias"], torch.ones(12, dtype=torch.bfloat16))
    return {"needed": reader.report.bytes_needed, "read": reader.report.bytes_read}
