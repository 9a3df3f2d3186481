"""Resharding as a property: whatever layout a checkpoint was saved in (plain
tensor, DTensor on a 1-d, 2-d or 3-d mesh, any world size 1-4), loading it into any
other layout gives every rank exactly the bytes of its piece of the tensor.

The expected piece on each rank comes from DTensor's own
``distribute_tensor(full, mesh, placements).to_local()``, so the test does not
re-implement the sharding geometry. Every load must also read exactly the bytes
it needs (``report.bytes_read == bytes_needed``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]

# A layout, in a picklable form: ("plain",) or (mesh_shape, placements) where
# each placement is ("S", dim) or ("R",).
Layout = tuple[Any, ...]
PLAIN: Layout = ("plain",)

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.int16,
    torch.float64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]
KEYS = ("a", "b")


_meshes: dict[tuple[int, ...], DeviceMesh] = {}


def mesh_of(shape: tuple[int, ...]) -> DeviceMesh:
    """One mesh per shape per worker process (a 2-d mesh makes new groups)."""
    if shape not in _meshes:
        _meshes[shape] = init_device_mesh("cpu", shape)
    return _meshes[shape]


def placements_of(layout: Layout) -> list[Placement]:
    return [Shard(p[1]) if p[0] == "S" else Replicate() for p in layout[1]]


def place(full: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``full`` in ``layout``; each rank cuts its own piece (no scatter)."""
    if layout == PLAIN:
        return full.clone()
    return distribute_tensor(
        full, mesh_of(tuple(layout[0])), placements_of(layout), src_data_rank=None
    )


def local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


Spec = tuple[tuple[int, ...], torch.dtype, int]  # (shape, dtype, seed) per key


def save_worker(
    rank: int, world_size: int, path: str, specs: list[Spec], layouts: list[Layout]
) -> bool:
    state = {
        key: place(random_tensor(shape, dtype, seed), layout)
        for key, (shape, dtype, seed), layout in zip(KEYS, specs, layouts, strict=True)
    }
    distcp.save(state, checkpoint_id=path)
    return True


def load_worker(
    rank: int, world_size: int, path: str, specs: list[Spec], layouts: list[Layout]
) -> tuple[list[str], int, int, int]:
    """Load into zeros of ``layouts``; returns (problems, local shard bytes,
    report.bytes_needed, report.bytes_read)."""
    target: dict[str, Any] = {}
    expected: dict[str, torch.Tensor] = {}
    for key, (shape, dtype, seed), layout in zip(KEYS, specs, layouts, strict=True):
        full = random_tensor(shape, dtype, seed)
        target[key] = place(torch.zeros_like(full), layout)
        expected[key] = local(place(full, layout))
    reader = distcp.FileSystemReader(path)
    distcp.load(target, storage_reader=reader)
    problems = []
    shard_bytes = 0
    for key, want in expected.items():
        got = local(target[key])
        shard_bytes += want.numel() * want.element_size()
        if got.dtype != want.dtype or got.shape != want.shape:
            problems.append(
                f"{key}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
            )
        elif raw(got) != raw(want):
            problems.append(f"{key}: bytes differ")
    return problems, shard_bytes, reader.report.bytes_needed, reader.report.bytes_read


def check(
    rank_pool: PoolFactory,
    path: Path,
    specs: list[Spec],
    save: tuple[int, list[Layout]],
    load: tuple[int, list[Layout]],
) -> None:
    path.mkdir(parents=True)
    assert all(rank_pool(save[0]).run(save_worker, str(path), specs, save[1]))
    results = rank_pool(load[0]).run(load_worker, str(path), specs, load[1])
    context = f"specs={specs} save={save} load={load}"
    for rank, (problems, shard_bytes, needed, read) in enumerate(results):
        assert problems == [], f"rank {rank}: {problems} ({context})"
        # A whole-tensor load reads exactly what it needs: blocks split between
        # ranks are verified jointly, never read whole.
        assert needed == shard_bytes, f"rank {rank}: bytes_needed ({context})"
        assert read == needed, f"rank {rank}: read {read} of {needed} bytes needed ({context})"


# ---------------------------------------------------------------- property


def placement(ndim: int) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(st.just(("R",)), st.integers(0, ndim - 1).map(lambda d: ("S", d)))


@st.composite
def layouts(draw: st.DrawFn, world_size: int, ndim: int) -> Layout:
    kinds = ["plain", "1d"] + (["2d"] if world_size == 4 else []) + ["3d"] * (world_size > 1)
    kind = draw(st.sampled_from(kinds))
    if kind == "plain":
        return PLAIN
    if kind == "1d":
        return ((world_size,), (draw(placement(ndim)),))
    if kind == "2d":
        return ((2, 2), (draw(placement(ndim)), draw(placement(ndim))))
    mesh = draw(st.sampled_from(MESHES_3D[world_size]))
    return (mesh, tuple(draw(placement(ndim)) for _ in mesh))


#: 3-d meshes of 2-4 ranks (dims of size 1 included, as a job's mesh may have).
MESHES_3D = {
    2: [(1, 2, 1), (2, 1, 1)],
    3: [(1, 1, 3)],
    4: [(2, 2, 1), (1, 2, 2), (2, 1, 2)],
}


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
_examples = itertools.count()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_layout_loads_into_any_other(
    rank_pool: PoolFactory, tmp_path: Path, data: st.DataObject
) -> None:
    for world_size in (1, 2, 3, 4):  # start every pool outside the timed part
        rank_pool(world_size)
    shape_a = data.draw(shapes, label="shape a")
    shape_b = data.draw(shapes, label="shape b")
    if shape_b == shape_a:  # the second key always has a different shape
        shape_b = (*shape_b[:-1], shape_b[-1] % 9 + 1)
    dtype_a = data.draw(st.sampled_from(DTYPES), label="dtype a")
    dtype_b = data.draw(st.sampled_from(DTYPES), label="dtype b")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    specs: list[Spec] = [(shape_a, dtype_a, seed), (shape_b, dtype_b, seed + 1)]
    sides = []
    for side in ("save", "load"):
        world_size = data.draw(st.integers(1, 4), label=f"{side} world size")
        chosen = [
            data.draw(layouts(world_size, len(shape)), label=f"{side} layout {key}")
            for key, (shape, _, _) in zip(KEYS, specs, strict=True)
        ]
        sides.append((world_size, chosen))
    check(rank_pool, tmp_path / f"ex{next(_examples)}", specs, sides[0], sides[1])


# ---------------------------------------------------------------- named cases


def one_d(world_size: int, *placements: tuple[Any, ...]) -> Layout:
    return ((world_size,), placements)


def two_d(*placements: tuple[Any, ...]) -> Layout:
    return ((2, 2), placements)


NAMED_CASES = {
    # name: (shape a, shape b, save (N, layouts), load (M, layouts))
    "4->2 shard0->shard1": (
        (8, 6),
        (5, 3),
        (4, [one_d(4, ("S", 0))] * 2),
        (2, [one_d(2, ("S", 1))] * 2),
    ),
    "4->3 uneven": ((7, 5), (9,), (4, [one_d(4, ("S", 0))] * 2), (3, [one_d(3, ("S", 0))] * 2)),
    "1d(4)->2d(2,2) shard0,shard1": (
        (6, 7),
        (5, 9),
        (4, [one_d(4, ("S", 0)), one_d(4, ("S", 1))]),
        (4, [two_d(("S", 0), ("S", 1))] * 2),
    ),
    "hsdp(4)->1 plain": ((7, 4), (3, 5), (4, [two_d(("R",), ("S", 0))] * 2), (1, [PLAIN] * 2)),
    "plain->4 sharded": (
        (9, 2),
        (4, 4, 3),
        (2, [PLAIN] * 2),
        (4, [one_d(4, ("S", 0)), one_d(4, ("S", 2))]),
    ),
    "3d(2,1,2)->1d(3) uneven": (
        (7, 5, 3),
        (9, 2),
        (4, [((2, 1, 2), (("S", 0), ("R",), ("S", 2))), ((2, 1, 2), (("S", 1), ("S", 0), ("R",)))]),
        (3, [one_d(3, ("S", 1)), one_d(3, ("S", 0))]),
    ),
    "replicated->sharded": (
        (5, 6),
        (7,),
        (3, [one_d(3, ("R",))] * 2),
        (4, [two_d(("S", 0), ("S", 0)), one_d(4, ("S", 0))]),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(NAMED_CASES))
def test_named_resharding_case(
    rank_pool: PoolFactory, tmp_path: Path, name: str, dtype: torch.dtype
) -> None:
    shape_a, shape_b, save, load = NAMED_CASES[name]
    specs: list[Spec] = [(shape_a, dtype, 1), (shape_b, dtype, 2)]
    check(rank_pool, tmp_path / "ckpt", specs, save, load)
