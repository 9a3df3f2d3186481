"""async_save: the snapshot is the state at the call, errors reach the future,
staging buffers are reused; and plan caching for repeated saves."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.async_save import staging_buffers
from distcp.planner import SavePlan
from rank_pool import RankPool

PoolFactory = Callable[[int], RankPool]


def state() -> dict[str, Any]:
    return {
        "w": random_tensor((64, 33), torch.float32, 1),
        "b": random_tensor((7,), torch.bfloat16, 2),
        "meta": {"step": 3, "names": ["a", "b"]},
    }


def load_back(path: Path) -> dict[str, Any]:
    target: dict[str, Any] = {
        "w": torch.zeros(64, 33),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "meta": {"step": 0, "names": []},
    }
    distcp.load(target, checkpoint_id=path, no_dist=True)
    return target


def test_the_checkpoint_holds_the_state_as_it_was_at_the_call(tmp_path: Path) -> None:
    live = state()
    expected = {"w": raw(live["w"]), "b": raw(live["b"])}
    future = distcp.async_save(live, checkpoint_id=tmp_path, no_dist=True)
    assert isinstance(future, Future)
    live["w"].fill_(0.5)  # training goes on right after the call returns
    live["b"].zero_()
    live["meta"]["step"] = 4
    live["meta"]["names"].append("c")
    metadata = future.result(timeout=60)
    assert "w" in metadata.state_dict_metadata
    loaded = load_back(tmp_path)
    assert raw(loaded["w"]) == expected["w"] and raw(loaded["b"]) == expected["b"]
    assert loaded["meta"] == {"step": 3, "names": ["a", "b"]}


def test_errors_reach_the_future_and_the_last_checkpoint_survives(tmp_path: Path) -> None:
    distcp.save(state(), checkpoint_id=tmp_path, no_dist=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = state()
    bad["fn"] = lambda: None  # not encodable without pickle: refused while planning
    future = distcp.async_save(bad, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(distcp.UnsupportedValueError, match="'fn'"):
        future.result(timeout=60)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_repeated_saves_reuse_the_staging_buffers(tmp_path: Path) -> None:
    live = state()
    distcp.async_save(live, checkpoint_id=tmp_path / "0", no_dist=True).result(timeout=60)
    buffers = staging_buffers()
    allocated = buffers.allocations
    for step in range(1, 4):
        live["w"].add_(1)
        distcp.async_save(live, checkpoint_id=tmp_path / str(step), no_dist=True).result(timeout=60)
    assert buffers.allocations == allocated  # the same structure: nothing new
    assert raw(load_back(tmp_path / "3")["w"]) == raw(live["w"])
    live["w"] = torch.zeros(65, 33)  # a changed shape needs one new buffer
    distcp.async_save(live, checkpoint_id=tmp_path / "4", no_dist=True).result(timeout=60)
    assert buffers.allocations == allocated + 1


def test_a_second_call_waits_for_the_first(tmp_path: Path) -> None:
    live = state()
    first = distcp.async_save(live, checkpoint_id=tmp_path / "a", no_dist=True)
    second = distcp.async_save(live, checkpoint_id=tmp_path / "b", no_dist=True)
    assert first.done()  # the second call waited before reusing the buffers
    second.result(timeout=60)


def async_on_ranks(rank: int, world_size: int, path: str) -> bool:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((10, 6), torch.float32, 5)
    live = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)], src_data_rank=None)}
    future = distcp.async_save(live, checkpoint_id=path)
    live["w"].to_local().fill_(-1.0)
    for _ in range(20):  # the training's own collectives, while the save runs
        dist.all_reduce(torch.ones(3))
    future.result(timeout=120)
    target = {"w": distribute_tensor(torch.zeros(10, 6), mesh, [Shard(1)], src_data_rank=None)}
    distcp.load(target, checkpoint_id=path)
    assert isinstance(target["w"], DTensor)
    expected = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None).to_local()
    return raw(target["w"].to_local()) == raw(expected)


def test_async_save_on_two_ranks_alongside_training_collectives(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    assert all(rank_pool(2).run(async_on_ranks, str(tmp_path / "ckpt")))


def test_the_process_checkpointer_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(NotImplementedError, match="background thread only"):
        distcp.async_save(
            state(),
            checkpoint_id=tmp_path,
            no_dist=True,
            async_checkpointer_type=distcp.AsyncCheckpointerType.PROCESS,
        )


# --- plan caching


def counting_planner() -> tuple[type[distcp.DefaultSavePlanner], list[int]]:
    """A fresh planner class (its own cache key) counting global planning runs."""
    calls: list[int] = []

    class Counting(distcp.DefaultSavePlanner):
        def create_global_plan(self, all_plans: list[SavePlan]) -> Any:
            calls.append(1)
            return super().create_global_plan(all_plans)

    return Counting, calls


def test_plan_caching_skips_global_planning_until_the_structure_changes(
    tmp_path: Path,
) -> None:
    planner_class, calls = counting_planner()
    live = state()
    for step in range(3):
        live["w"].add_(1)
        distcp.save(
            live,
            checkpoint_id=tmp_path / str(step),
            planner=planner_class(enable_plan_caching=True),
            no_dist=True,
        )
        assert raw(load_back(tmp_path / str(step))["w"]) == raw(live["w"])
    assert len(calls) == 1  # planned once, reused twice
    live["w"] = random_tensor((64, 33), torch.float64, 9)  # same shape, other dtype
    distcp.save(
        live,
        checkpoint_id=tmp_path / "x",
        planner=planner_class(enable_plan_caching=True),
        no_dist=True,
    )
    assert len(calls) == 2
    live["extra"] = torch.ones(2)
    distcp.save(
        live,
        checkpoint_id=tmp_path / "y",
        planner=planner_class(enable_plan_caching=True),
        no_dist=True,
    )
    assert len(calls) == 3
    reader = distcp.FileSystemReader(tmp_path / "y")
    assert set(reader.read_metadata().state_dict_metadata) >= {"w", "extra"}


def test_without_caching_every_save_plans(tmp_path: Path) -> None:
    planner_class, calls = counting_planner()
    for step in range(2):
        distcp.save(
            state(), checkpoint_id=tmp_path / str(step), planner=planner_class(), no_dist=True
        )
    assert len(calls) == 2
