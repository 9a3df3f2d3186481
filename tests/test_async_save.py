"""async_save, in a background thread and in a writer process: the snapshot is
the state at the call, errors (planning, writing, a dead writer process) reach
the future and commit nothing, the staging arena and the writer process are
reused, each rank stages only what it writes; and plan caching."""

from __future__ import annotations

import os
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
from distcp.async_save import staging_buffers, writer_process
from distcp.planner import SavePlan
from distcp.storage import WriteResult
from distcp.testing import RankPool
from snapshots import checkpoint_bytes

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


KINDS = [distcp.AsyncCheckpointerType.THREAD, distcp.AsyncCheckpointerType.PROCESS]


@pytest.fixture(params=KINDS, ids=["thread", "process"])
def kind(request: pytest.FixtureRequest) -> distcp.AsyncCheckpointerType:
    return request.param  # type: ignore[no-any-return]


def test_the_checkpoint_holds_the_state_as_it_was_at_the_call(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    live = state()
    expected = {"w": raw(live["w"]), "b": raw(live["b"])}
    future = distcp.async_save(
        live, checkpoint_id=tmp_path, no_dist=True, async_checkpointer_type=kind
    )
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


def test_planning_errors_reach_the_future_and_the_last_checkpoint_survives(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    distcp.save(state(), checkpoint_id=tmp_path, no_dist=True)
    before = checkpoint_bytes(tmp_path)
    bad = state()
    bad["fn"] = lambda: None  # not encodable without pickle: refused while planning
    future = distcp.async_save(
        bad, checkpoint_id=tmp_path, no_dist=True, async_checkpointer_type=kind
    )
    with pytest.raises(distcp.UnsupportedValueError, match="'fn'"):
        future.result(timeout=60)
    assert checkpoint_bytes(tmp_path) == before


class FailingWriter(distcp.FileSystemWriter):
    """Fails while writing, after planning succeeded (in either writer)."""

    def write_data(self, plan: SavePlan, planner: Any) -> Future[list[WriteResult]]:
        raise OSError(28, "No space left on device (simulated)")


class DyingWriter(distcp.FileSystemWriter):
    """Ends the process that writes (the writer process, in PROCESS mode)."""

    def write_data(self, plan: SavePlan, planner: Any) -> Future[list[WriteResult]]:
        os._exit(3)


def test_write_errors_reach_the_future_and_the_last_checkpoint_survives(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    distcp.save(state(), checkpoint_id=tmp_path, no_dist=True)
    before = checkpoint_bytes(tmp_path)
    future = distcp.async_save(
        state(), storage_writer=FailingWriter(tmp_path), no_dist=True, async_checkpointer_type=kind
    )
    with pytest.raises(distcp.DistributedCheckpointError, match="No space left"):
        future.result(timeout=60)
    assert checkpoint_bytes(tmp_path) == before


def test_a_dead_writer_process_fails_the_save_and_the_next_one_starts_afresh(
    tmp_path: Path,
) -> None:
    process = distcp.AsyncCheckpointerType.PROCESS
    distcp.save(state(), checkpoint_id=tmp_path / "ckpt", no_dist=True)
    before = checkpoint_bytes(tmp_path / "ckpt")
    future = distcp.async_save(
        state(),
        storage_writer=DyingWriter(tmp_path / "ckpt"),
        no_dist=True,
        async_checkpointer_type=process,
    )
    with pytest.raises(distcp.CheckpointError, match=r"writer process .* died with exit code 3"):
        future.result(timeout=60)
    assert checkpoint_bytes(tmp_path / "ckpt") == before
    live = state()
    distcp.async_save(
        live, checkpoint_id=tmp_path / "next", no_dist=True, async_checkpointer_type=process
    ).result(timeout=60)
    assert raw(load_back(tmp_path / "next")["w"]) == raw(live["w"])


def test_repeated_saves_reuse_the_staging_arena(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    live = state()
    distcp.async_save(
        live, checkpoint_id=tmp_path / "0", no_dist=True, async_checkpointer_type=kind
    ).result(timeout=60)
    buffers = staging_buffers(kind)
    assert buffers is not None
    allocated, arena = buffers.allocations, buffers.arena
    for step in range(1, 4):
        live["w"].add_(1)
        distcp.async_save(
            live, checkpoint_id=tmp_path / str(step), no_dist=True, async_checkpointer_type=kind
        ).result(timeout=60)
    assert buffers.allocations == allocated and buffers.arena is arena  # nothing new
    assert raw(load_back(tmp_path / "3")["w"]) == raw(live["w"])
    live["w"] = random_tensor((650, 33), torch.float32, 4)  # no longer fits: a new arena
    distcp.async_save(
        live, checkpoint_id=tmp_path / "4", no_dist=True, async_checkpointer_type=kind
    ).result(timeout=60)
    assert buffers.allocations == allocated + 1
    assert buffers.arena is not arena and buffers.arena is not None
    assert buffers.arena.size >= 650 * 33 * 4


def test_the_writer_process_is_kept_across_saves(tmp_path: Path) -> None:
    process = distcp.AsyncCheckpointerType.PROCESS
    pids = set()
    for step in range(3):
        distcp.async_save(
            state(),
            checkpoint_id=tmp_path / str(step),
            no_dist=True,
            async_checkpointer_type=process,
        ).result(timeout=60)
        writer = writer_process()
        assert writer is not None and writer.alive()
        pids.add(writer.process.pid)
    assert len(pids) == 1 and os.getpid() not in pids


def test_a_second_call_waits_for_the_first(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    live = state()
    first = distcp.async_save(
        live, checkpoint_id=tmp_path / "a", no_dist=True, async_checkpointer_type=kind
    )
    second = distcp.async_save(
        live, checkpoint_id=tmp_path / "b", no_dist=True, async_checkpointer_type=kind
    )
    assert first.done()  # the second call waited before reusing the arena
    second.result(timeout=60)


def async_on_ranks(rank: int, world_size: int, path: str, kind: str) -> bool:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((10, 6), torch.float32, 5)
    live = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)], src_data_rank=None)}
    future = distcp.async_save(
        live, checkpoint_id=path, async_checkpointer_type=distcp.AsyncCheckpointerType(kind)
    )
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
    tmp_path: Path, rank_pool: PoolFactory, kind: distcp.AsyncCheckpointerType
) -> None:
    assert all(rank_pool(2).run(async_on_ranks, str(tmp_path / "ckpt"), kind.value))


def stage_replicated(rank: int, world_size: int, path: str) -> tuple[int, int]:
    """DDP-style: every rank holds the same tensors; each stages only the ones
    the plan gives it to write."""
    live = {f"w{n}": random_tensor((32, 16), torch.float32, n) for n in range(8)}
    distcp.async_save(live, checkpoint_id=path).result(timeout=120)
    buffers = staging_buffers()
    assert buffers is not None
    target = {key: torch.zeros(32, 16) for key in live}
    distcp.load(target, checkpoint_id=path)
    assert all(raw(target[key]) == raw(live[key]) for key in live)
    return buffers.staged_bytes, sum(t.numel() * 4 for t in live.values())


def test_replicated_state_is_staged_once_across_the_ranks(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    staged = rank_pool(2).run(stage_replicated, str(tmp_path / "ckpt"))
    total = staged[0][1]
    assert sum(part for part, _ in staged) == total  # each tensor staged by one rank
    assert all(0 < part < total for part, _ in staged)  # and the work is shared


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


def test_a_plan_of_many_items_reaches_the_writer_process_whole(tmp_path: Path) -> None:
    """Jobs go to the writer process in batches of items: every one arrives."""
    live = {f"t{n}": random_tensor((n % 7 + 1, 3), torch.float32, n) for n in range(600)}
    expected = {key: raw(value) for key, value in live.items()}
    future = distcp.async_save(
        live,
        checkpoint_id=tmp_path,
        no_dist=True,
        async_checkpointer_type=distcp.AsyncCheckpointerType.PROCESS,
    )
    for value in live.values():
        value.zero_()
    future.result(timeout=120)
    target = {key: torch.empty_like(value) for key, value in live.items()}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert {key: raw(value) for key, value in target.items()} == expected


SPAWNED_PICKLER = """
import pickle, sys
import torch
import torch.multiprocessing as mp
from distcp.metadata import TensorProperties

def dump(rank):
    sys.stdout.write(pickle.dumps(TensorProperties(dtype=torch.bfloat16)).hex())

if __name__ == "__main__":
    mp.spawn(dump, nprocs=1)
"""


def test_plans_pickled_in_a_spawned_rank_load_in_another_process(tmp_path: Path) -> None:
    """In a rank started by ``torch.multiprocessing.spawn`` from a script that
    imports torch, pickle names ``torch.contiguous_format`` after the script's
    module (``__mp_main__``), which the writer process does not have. A plan's
    tensor properties must pickle by name instead."""
    import pickle
    import subprocess
    import sys

    from distcp.metadata import TensorProperties

    script = tmp_path / "train.py"
    script.write_text(SPAWNED_PICKLER)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = bytes.fromhex(done.stdout.strip())
    assert b"__mp_main__" not in data and b"__main__" not in data
    assert pickle.loads(data) == TensorProperties(dtype=torch.bfloat16)
