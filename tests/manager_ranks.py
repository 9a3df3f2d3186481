"""Rank functions for tests/test_manager.py (module-level for spawned ranks)."""

from __future__ import annotations

from typing import Any

import torch

import distcp
from distcp.manager import CheckpointManager


def weights(step: int) -> torch.Tensor:
    return torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6) + step


def _sharded(full: torch.Tensor, world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(full, init_device_mesh("cpu", (world_size,)), [Shard(0)])


def save_steps(
    rank: int, world_size: int, root: str, steps: list[int], mode: str | None
) -> list[int]:
    with CheckpointManager(root, async_mode=mode, keep_latest_k=2) as manager:
        for step in steps:
            manager.save(step, {"w": _sharded(weights(step), world_size), "step": step})
    return manager.all_steps()


def background_error_everywhere(rank: int, world_size: int, root: str) -> str:
    """The second save fails on rank 1 while in flight; the next call raises
    on every rank."""
    manager = CheckpointManager(root, async_mode="thread")
    manager.save(1, {"w": _sharded(weights(1), world_size)})
    manager.wait()
    original = distcp.FileSystemWriter.write_data
    if rank == 1:

        def failing(self: Any, plan: Any, planner: Any) -> Any:
            raise OSError(5, "Input/output error (injected)")

        distcp.FileSystemWriter.write_data = failing  # type: ignore[method-assign]
    try:
        manager.save(2, {"w": _sharded(weights(2), world_size)})  # fails in the background
        manager.save(3, {"w": _sharded(weights(3), world_size)})
    except distcp.CheckpointError as error:
        message = str(error)
    else:
        raise AssertionError(f"rank {rank}: the background error did not surface")
    finally:
        distcp.FileSystemWriter.write_data = original  # type: ignore[method-assign]
    manager.close()
    assert manager.all_steps() == [1], manager.all_steps()
    return message


def load_latest_on(rank: int, world_size: int, root: str) -> int | None:
    full = torch.zeros(8, 6)
    state = {"w": _sharded(full, world_size), "step": 0}
    with CheckpointManager(root) as manager:
        step = manager.load(state)
    assert step is not None and state["step"] == step
    assert torch.equal(state["w"].full_tensor(), weights(step))
    return step
