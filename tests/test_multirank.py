"""Saving and loading on several real ranks (gloo, CPU): DTensors, ShardedTensors,
replicated plain tensors, nested values; replicated writes done once and shared
out; loading into a different layout; and inconsistent shapes across ranks."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp import knobs
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
DATA_FILE = re.compile(r"data-[0-9a-f]{16}-(\d{5})-\d{3}\.distcp")


def chunk_sharded(full: torch.Tensor, world_size: int, fill: bool) -> Any:
    """A ShardedTensor split over the ranks along dim 0 (torch.chunk sizes)."""
    spec = ChunkShardingSpec(dim=0, placements=[f"rank:{r}/cpu" for r in range(world_size)])
    tensor = sharded_tensor.empty(spec, *full.shape, dtype=full.dtype)
    for shard in tensor.local_shards():
        offset, rows = shard.metadata.shard_offsets[0], shard.metadata.shard_sizes[0]
        shard.tensor.copy_(full[offset : offset + rows] if fill else torch.zeros_like(shard.tensor))
    return tensor


def dtensor(
    full: torch.Tensor, mesh: DeviceMesh, placements: list[Placement], fill: bool = True
) -> Any:
    """Each rank cuts its own piece of ``full`` (no scatter: gloo lacks some dtypes)."""
    source = full if fill else torch.zeros_like(full)
    return distribute_tensor(source, mesh, placements, src_data_rank=None)


def build_state(world_size: int, fill: bool) -> dict[str, Any]:
    """A model-and-optimizer-like state with every kind of value, filled with
    the saved data (``fill``) or zeros and placeholders of the same layout."""
    mesh = init_device_mesh("cpu", (world_size,))

    def value(saved: Any, placeholder: Any) -> Any:
        return saved if fill else placeholder

    state: dict[str, Any] = {
        "model": {
            "rows": dtensor(random_tensor((7, 3), torch.float32, 1), mesh, [Shard(0)], fill),
            "cols": dtensor(random_tensor((3, 10), torch.float16, 2), mesh, [Shard(1)], fill),
            "tiny": dtensor(random_tensor((3, 2), torch.bfloat16, 3), mesh, [Shard(0)], fill),
            "repl": dtensor(random_tensor((4, 4), torch.int64, 4), mesh, [Replicate()], fill),
            "table": chunk_sharded(random_tensor((10, 4), torch.float64, 5), world_size, fill),
            "bias": random_tensor((5,), torch.int32, 6)
            if fill
            else torch.zeros(5, dtype=torch.int32),
            "mask": random_tensor((6,), torch.bool, 7)
            if fill
            else torch.zeros(6, dtype=torch.bool),
        },
        "optim": {
            "state": {
                0: {
                    "step": torch.tensor(12.0) if fill else torch.tensor(0.0),
                    "exp_avg": dtensor(
                        random_tensor((7, 3), torch.float32, 8), mesh, [Shard(0)], fill
                    ),
                },
            },
            "param_groups": value([{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}], []),
        },
        "layers": [
            random_tensor((2, 2), torch.float32, 9) if fill else torch.zeros(2, 2),
            {
                "w": random_tensor((3,), torch.bfloat16, 10)
                if fill
                else torch.zeros(3, dtype=torch.bfloat16)
            },
        ],
        "epoch": value(3, 0),
        "run": value(
            {"name": "demo", "seed": None, "ratio": 0.25}, {"name": "", "seed": 0, "ratio": 0.0}
        ),
    }
    if world_size == 4:  # a 2-d mesh as well: Shard x Shard and Replicate x Shard
        mesh2 = init_device_mesh("cpu", (2, 2))
        full = random_tensor((5, 6), torch.float32, 11)
        state["model"]["grid"] = dtensor(full, mesh2, [Shard(0), Shard(1)], fill)
        state["model"]["half"] = dtensor(full, mesh2, [Replicate(), Shard(0)], fill)
    return state


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaves(child, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from leaves(child, f"{path}.{index}")
    else:
        yield path, value


def local_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, DTensor):
        return [value.to_local()]
    if isinstance(value, sharded_tensor.ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    return [value]


def differences(loaded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Every leaf of ``loaded`` that is not bit-for-bit ``expected``'s."""
    problems = []
    got, want = dict(leaves(loaded)), dict(leaves(expected))
    if got.keys() != want.keys():
        return [f"keys differ: {sorted(got.keys() ^ want.keys())}"]
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            if type(got[key]) is not type(value):
                problems.append(f"{key}: {type(got[key]).__name__} is not {type(value).__name__}")
                continue
            for mine, theirs in zip(local_tensors(got[key]), local_tensors(value), strict=True):
                if mine.dtype != theirs.dtype or mine.shape != theirs.shape:
                    problems.append(f"{key}: {mine.dtype}{list(mine.shape)} vs {theirs.dtype}")
                elif raw(mine) != raw(theirs):
                    problems.append(f"{key}: bytes differ")
        elif type(got[key]) is not type(value) or got[key] != value:
            problems.append(f"{key}: {got[key]!r} != {value!r}")
    return problems


def storage_pointers(state: dict[str, Any]) -> dict[str, tuple[int, list[int]]]:
    return {
        key: (id(value), [t.data_ptr() for t in local_tensors(value)])
        for key, value in leaves(state)
        if isinstance(value, torch.Tensor)
    }


def round_trip(rank: int, world_size: int, path: str) -> tuple[list[str], list[str]]:
    distcp.save(build_state(world_size, fill=True), checkpoint_id=path)
    target = build_state(world_size, fill=False)
    before = storage_pointers(target)
    distcp.load(target, checkpoint_id=path)
    moved = [key for key, where in storage_pointers(target).items() if before[key] != where]
    return differences(target, build_state(world_size, fill=True)), moved


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_round_trip_is_bit_exact_and_in_place(
    rank_pool: PoolFactory, tmp_path: Path, world_size: int
) -> None:
    results = rank_pool(world_size).run(round_trip, str(tmp_path))
    for rank, (problems, moved) in enumerate(results):
        assert problems == [], f"rank {rank}"
        assert moved == [], f"rank {rank}: not loaded in place"


REPLICATED_SIZES = [4096, 2048, 1024, 1024, 512, 512, 256, 128, 128, 64]  # bytes, 64-aligned


def replicated_state(world_size: int) -> dict[str, Any]:
    state: dict[str, Any] = {
        f"w{i}": random_tensor((size // 4,), torch.float32, i)
        for i, size in enumerate(REPLICATED_SIZES)
    }
    mesh = init_device_mesh("cpu", (world_size,))
    state["dt"] = dtensor(random_tensor((8, 8), torch.float64, 99), mesh, [Replicate()])
    return state


def save_replicated(rank: int, world_size: int, path: str) -> bool:
    distcp.save(replicated_state(world_size), checkpoint_id=path)
    target = {k: torch.zeros_like(v) for k, v in replicated_state(world_size).items()}
    distcp.load(target, checkpoint_id=path)
    return differences(target, replicated_state(world_size)) == []


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_replicated_tensors_are_written_once_with_the_work_shared(
    rank_pool: PoolFactory, tmp_path: Path, world_size: int
) -> None:
    assert all(rank_pool(world_size).run(save_replicated, str(tmp_path)))
    sizes = [*REPLICATED_SIZES, 8 * 8 * 8]
    unique, largest = sum(sizes), max(sizes)
    per_rank: dict[int, int] = defaultdict(int)
    for file in tmp_path.iterdir():
        match = DATA_FILE.fullmatch(file.name)
        if match:
            per_rank[int(match.group(1))] += file.stat().st_size
    total = sum(per_rank.values())
    assert unique <= total <= unique + knobs.CHUNK_ALIGNMENT * len(sizes), per_rank
    assert sorted(r for r, n in per_rank.items() if n) == list(range(world_size)), per_rank
    fair = unique / world_size
    assert max(per_rank.values()) <= fair + largest + knobs.CHUNK_ALIGNMENT * len(sizes), per_rank


ROWS = random_tensor((9, 4), torch.float32, 20)
COLS = random_tensor((5, 6), torch.bfloat16, 21)
TABLE = random_tensor((6, 3), torch.int16, 22)


def save_on_four(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    state = {
        "rows": dtensor(ROWS, mesh, [Shard(0)]),
        "cols": dtensor(COLS, mesh, [Shard(0)]),
        "table": chunk_sharded(TABLE, world_size, fill=True),
        "step": 7,
    }
    distcp.save(state, checkpoint_id=path)


def load_on_two(rank: int, world_size: int, path: str) -> list[str]:
    """Shard(0) over 4 ranks → Shard(0) and Shard(1) over 2; a ShardedTensor → a DTensor."""
    mesh = init_device_mesh("cpu", (world_size,))
    target = {
        "rows": dtensor(torch.zeros_like(ROWS), mesh, [Shard(0)]),
        "cols": dtensor(torch.zeros_like(COLS), mesh, [Shard(1)]),
        "table": dtensor(torch.zeros_like(TABLE), mesh, [Shard(0)]),
        "step": 0,
    }
    distcp.load(target, checkpoint_id=path)
    expected = {
        "rows": dtensor(ROWS, mesh, [Shard(0)]),
        "cols": dtensor(COLS, mesh, [Shard(1)]),
        "table": dtensor(TABLE, mesh, [Shard(0)]),
        "step": 7,
    }
    return differences(target, expected)


def test_save_on_four_ranks_load_on_two_and_on_one(rank_pool: PoolFactory, tmp_path: Path) -> None:
    rank_pool(4).run(save_on_four, str(tmp_path))
    assert rank_pool(2).run(load_on_two, str(tmp_path)) == [[], []]
    assert not dist.is_initialized()
    target = {
        "rows": torch.zeros_like(ROWS),
        "cols": torch.zeros_like(COLS),
        "table": torch.zeros_like(TABLE),
        "step": 0,
    }
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert differences(target, {"rows": ROWS, "cols": COLS, "table": TABLE, "step": 7}) == []


def save_inconsistent(rank: int, world_size: int, path: str, kind: str) -> tuple[str, str]:
    if kind == "plain":
        value: Any = torch.zeros(4 if rank == 0 else 5, 3)
    else:  # the same local rows, declared part of a different global shape
        mesh = init_device_mesh("cpu", (world_size,))
        rows = 8 if rank == 0 else 9
        chunk = -(-rows // world_size)
        start = min(rank * chunk, rows)
        local = torch.zeros(min(start + chunk, rows) - start, 2)
        value = DTensor.from_local(
            local, mesh, [Shard(0)], shape=torch.Size([rows, 2]), stride=(2, 1)
        )
    with pytest.raises(distcp.DistributedCheckpointError) as caught:
        distcp.save({"ok": torch.ones(2), "bad.weight": value}, checkpoint_id=path)
    return type(caught.value).__name__, str(caught.value)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["plain", "dtensor"])
def test_different_global_shapes_fail_the_same_way_on_every_rank(
    rank_pool: PoolFactory, tmp_path: Path, world_size: int, kind: str
) -> None:
    results = rank_pool(world_size).run(save_inconsistent, str(tmp_path), kind)
    assert len(set(results)) == 1, results
    kind_name, message = results[0]
    assert kind_name == "DistributedCheckpointError"
    assert "'bad.weight'" in message and "shape" in message
    assert not (tmp_path / ".metadata.distcp").exists()


def save_in_subgroups(rank: int, world_size: int, path: str) -> tuple[list[float], int]:
    """Ranks {0, 1} and {2, 3} save and load separate checkpoints at once."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    half = rank // 2
    group, checkpoint = groups[half], f"{path}/group{half}"
    state = {"w": torch.full((4,), float(half)), "half": half}
    distcp.save(state, checkpoint_id=checkpoint, process_group=group)
    target = {"w": torch.zeros(4), "half": -1}
    distcp.load(target, checkpoint_id=checkpoint, process_group=group)
    return target["w"].tolist(), target["half"]


def test_subgroups_save_their_own_checkpoints(rank_pool: PoolFactory, tmp_path: Path) -> None:
    results = rank_pool(4).run(save_in_subgroups, str(tmp_path))
    assert results == [([0.0] * 4, 0)] * 2 + [([1.0] * 4, 1)] * 2
    for half in (0, 1):
        ranks = {
            DATA_FILE.fullmatch(p.name).group(1) for p in (tmp_path / f"group{half}").glob("data-*")
        }
        assert ranks == {"00000", "00001"}, "file names carry the rank within the group"
