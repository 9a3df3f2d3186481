"""Layouts beyond Shard/Replicate: DTensor strided sharding (FSDP2 over tensor
parallel), ShardedTensor with an EnumerableShardingSpec or an uneven
ChunkShardingSpec, and the errors for meta, Partial and ambiguous layouts.

The mapping of strided sharding to boxes is checked against PyTorch itself:
its own splitting code on index tensors (no processes needed), and
``distribute_tensor`` / ``full_tensor`` on real gloo ranks. Every load is
compared bit for bit (random bit patterns) and checked to land in place."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import ChunkShardingSpec, EnumerableShardingSpec
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

import distcp
from bit_patterns import random_tensor, raw
from distcp.tensor_layout import (
    is_ambiguous,
    nested_order,
    runs_left_to_right,
    runs_nested,
    tensor_layout,
)
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]

# A layout in picklable form:
#   ("plain",)                         a plain tensor, the same on every rank
#   ("dt", mesh_shape, placements)     placements: ("R",), ("S", d), ("SS", d, split_factor)
#   ("chunk", dim)                     ShardedTensor, ChunkShardingSpec over every rank
#   ("enum", ((offsets, sizes, rank), ...))   ShardedTensor, EnumerableShardingSpec
Layout = tuple[Any, ...]
PLAIN: Layout = ("plain",)
Spec = tuple[tuple[int, ...], torch.dtype, int, Layout]  # shape, dtype, seed, layout


def dt(*placements: tuple[Any, ...], mesh: tuple[int, ...] = (2, 2)) -> Layout:
    return ("dt", mesh, placements)


def fsdp_tp(dim: int = 0) -> Layout:
    """What fully_shard over a tensor-parallel Shard(dim) gives on a (dp, tp) mesh."""
    return dt(("SS", dim, 2), ("S", dim))


# ---------------------------------------------------------------- building values

_meshes: dict[tuple[int, ...], DeviceMesh] = {}


def mesh_of(shape: tuple[int, ...]) -> DeviceMesh:
    """One mesh per shape per worker process (a 2-d mesh makes new groups)."""
    if shape not in _meshes:
        _meshes[shape] = init_device_mesh("cpu", shape)
    return _meshes[shape]


def placement_of(spec: tuple[Any, ...]) -> Placement:
    if spec[0] == "SS":
        return _StridedShard(spec[1], split_factor=spec[2])
    if spec[0] == "S":
        return Shard(spec[1])
    return Replicate()


def place(full: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``full`` in ``layout``; every rank cuts its own piece (no scatter)."""
    if layout[0] == "plain":
        return full.clone()
    if layout[0] == "dt":
        placements = [placement_of(p) for p in layout[2]]
        return distribute_tensor(full, mesh_of(layout[1]), placements, src_data_rank=None)
    if layout[0] == "chunk":
        world = dist.get_world_size()
        spec: Any = ChunkShardingSpec(
            dim=layout[1], placements=[f"rank:{r}/cpu" for r in range(world)]
        )
    else:
        spec = EnumerableShardingSpec(
            [ShardMetadata(list(o), list(s), f"rank:{r}/cpu") for o, s, r in layout[1]]
        )
    tensor = sharded_tensor.empty(spec, *full.shape, dtype=full.dtype)
    for shard in tensor.local_shards():
        if shard.tensor.numel() == 0:  # may sit past the end (ChunkShardingSpec, 2 rows on 4)
            continue
        piece = full
        for d, (o, s) in enumerate(
            zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
        ):
            piece = piece.narrow(d, o, s)
        shard.tensor.copy_(piece)
    return tensor


def locals_of(value: torch.Tensor) -> list[torch.Tensor]:
    if isinstance(value, DTensor):
        return [value.to_local()]
    if isinstance(value, sharded_tensor.ShardedTensor):
        return [shard.tensor for shard in value.local_shards()]
    return [value]


def build(specs: dict[str, Spec], zeros: bool = False) -> dict[str, torch.Tensor]:
    state = {}
    for key, (shape, dtype, seed, layout) in specs.items():
        full = random_tensor(shape, dtype, seed)
        state[key] = place(torch.zeros_like(full) if zeros else full, layout)
    return state


def save_worker(rank: int, world_size: int, path: str, specs: dict[str, Spec]) -> bool:
    distcp.save(build(specs), checkpoint_id=path)
    return True


def load_worker(rank: int, world_size: int, path: str, specs: dict[str, Spec]) -> list[str]:
    """Load into zeros of each spec's layout; every local piece must then hold
    exactly the bytes of the saved tensor, in the tensors it had before."""
    target = build(specs, zeros=True)
    before = {key: [t.data_ptr() for t in locals_of(v)] for key, v in target.items()}
    distcp.load(target, checkpoint_id=path)
    expected = build(specs)
    problems = []
    for key, value in target.items():
        if [t.data_ptr() for t in locals_of(value)] != before[key]:
            problems.append(f"{key}: not loaded in place")
        for got, want in zip(locals_of(value), locals_of(expected[key]), strict=True):
            if got.shape != want.shape or raw(got) != raw(want):
                problems.append(f"{key}: {list(got.shape)} bytes differ from {list(want.shape)}")
    return problems


def load_plain_here(path: Path, specs: dict[str, Spec]) -> list[str]:
    """Load into plain tensors in this (the test's) process, without a group."""
    target = {key: torch.zeros(shape, dtype=dtype) for key, (shape, dtype, _, _) in specs.items()}
    distcp.load(target, checkpoint_id=path, no_dist=True)
    return [
        key
        for key, (shape, dtype, seed, _) in specs.items()
        if raw(target[key]) != raw(random_tensor(shape, dtype, seed))
    ]


def relayout(specs: dict[str, Spec], layouts: dict[str, Layout]) -> dict[str, Spec]:
    return {key: (*spec[:3], layouts[key]) for key, spec in specs.items()}


# ---------------------------------------------------------------- pure: the mapping


def torch_indices(size: int, placements: list[Placement], mesh: tuple[int, ...], coord: Any) -> Any:
    """The global indices a rank holds, by PyTorch's own splitting code."""
    index = torch.arange(size)
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, Replicate):
            pieces, _ = placement._split_tensor(  # type: ignore[attr-defined]
                index, mesh[mesh_dim], with_padding=False, contiguous=False
            )
            index = pieces[coord[mesh_dim]]
    return index.tolist()


def expand(runs: tuple[tuple[int, int], ...]) -> list[int]:
    return [i for start, length in runs for i in range(start, start + length)]


placement_specs = st.one_of(
    st.just(("R",)), st.just(("S", 0)), st.integers(1, 4).map(lambda f: ("SS", 0, f))
)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(0, 25),
    mesh=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    data=st.data(),
)
def test_runs_are_the_indices_pytorch_gives_each_rank(
    size: int, mesh: tuple[int, ...], data: st.DataObject
) -> None:
    specs = [data.draw(placement_specs) for _ in mesh]
    placements = [placement_of(p) for p in specs]
    sharded = [(n, p) for n, p in zip(mesh, specs, strict=True) if p[0] != "R"]
    shardings = tuple((n, p[2] if p[0] == "SS" else 0) for n, p in sharded)
    for coord in itertools.product(*(range(n) for n in mesh)):
        indices = tuple(c for c, p in zip(coord, specs, strict=True) if p[0] != "R")
        runs = runs_left_to_right(size, shardings, indices)
        want = torch_indices(size, placements, mesh, coord)
        assert expand(runs) == want, (coord, runs)
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(runs)), "runs merged, sorted"
        shape, offset = _compute_local_shape_and_global_offset((size,), mesh, coord, placements)
        assert shape == (len(want),)
        if want:
            assert offset == (want[0],)


def chunk_with_empty(indices: list[int], parts: int) -> list[list[int]]:
    step = -(-len(indices) // parts)
    return [indices[i * step : (i + 1) * step] if step else [] for i in range(parts)]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 40), dp=st.integers(1, 4), tp=st.integers(2, 4))
def test_nested_order_is_how_fully_shard_cuts_a_tp_shard(size: int, dp: int, tp: int) -> None:
    """FSDP2 over TP: each rank holds chunk(chunk(dim, tp)[t], dp)[d]; the
    layouts agree with DTensor's reading exactly when is_ambiguous says so."""
    shardings = ((dp, tp), (tp, 0))
    order = nested_order(shardings)
    assert order == (1, 0)
    differs = False
    for d, t in itertools.product(range(dp), range(tp)):
        truth = chunk_with_empty(chunk_with_empty(list(range(size)), tp)[t], dp)[d]
        assert expand(runs_nested(size, shardings, (d, t), order)) == truth
        differs |= expand(runs_left_to_right(size, shardings, (d, t))) != truth
    assert is_ambiguous(size, shardings) == differs
    if size % (dp * tp) == 0 or dp <= 2:
        assert not differs


def test_nested_order_of_other_patterns() -> None:
    assert nested_order(((2, 0), (3, 0))) == (0, 1)  # Shard, Shard: left to right
    assert nested_order(((2, 12), (3, 4), (4, 0))) == (2, 1, 0)  # nested strided
    assert nested_order(((2, 0), (3, 4), (4, 0))) == (0, 2, 1)
    assert nested_order(((2, 3), (2, 0))) is None  # not FSDP2's: DTensor's reading only
    assert is_ambiguous(9, ((4, 2), (2, 0)))
    assert not is_ambiguous(7, ((2, 3), (2, 0)))


def test_an_ambiguous_uneven_strided_layout_is_refused_naming_the_key() -> None:
    """dp=4, tp=2, 9 rows: DTensor puts row 8 on (dp 3, tp 0), FSDP2 on
    (dp 3, tp 1). Needs 8 ranks, so a fake process group stands in."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=7, world_size=8, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (4, 2))
        placements = [_StridedShard(0, split_factor=2), Shard(0)]
        value = DTensor.from_local(
            torch.zeros(1, 3), mesh, placements, shape=torch.Size([9, 3]), stride=(3, 1)
        )
        with pytest.raises(distcp.CheckpointError, match=r"'model\.w'.*ambiguous.*multiple of 8"):
            tensor_layout("model.w", value)
        even = DTensor.from_local(
            torch.zeros(1, 3), mesh, placements, shape=torch.Size([8, 3]), stride=(3, 1)
        )
        (chunk,) = tensor_layout("model.w", even).chunks
        assert chunk.box.offsets == (7, 0)  # (dp 3, tp 1): second TP half, last row
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- strided DTensors

STRIDED: dict[str, Spec] = {
    "fsdp_tp": ((8, 6), torch.float32, 1, fsdp_tp()),
    "fsdp_tp_uneven": ((7, 5), torch.bfloat16, 2, fsdp_tp()),
    "fsdp_tp_cols": ((3, 9), torch.float32, 3, fsdp_tp(1)),
    "fsdp_tp_tiny": ((3,), torch.bfloat16, 4, fsdp_tp()),  # some pieces empty
    "shard_then_strided": ((10, 3), torch.bfloat16, 5, dt(("S", 0), ("SS", 0, 2))),
    "strided_cols": ((4, 11), torch.float32, 6, dt(("SS", 1, 3), ("R",))),
    "strided_both": ((5, 6), torch.bfloat16, 7, dt(("SS", 0, 2), ("SS", 1, 3))),
    "shard_shard_tiny": ((2,), torch.float32, 8, dt(("S", 0), ("S", 0))),
    "table_past_end": ((2, 3), torch.bfloat16, 9, ("chunk", 0)),  # 4 ranks, 2 rows
}
# The same tensors as Shard(0)/Shard(1) DTensors on 2 ranks.
SHARDED_ON_TWO = {
    key: dt(("S", i % 2 if len(s[0]) > 1 else 0), mesh=(2,))
    for i, (key, s) in enumerate(STRIDED.items())
}
# Other strided layouts, to load a strided checkpoint into.
RESTRIDED: dict[str, Layout] = {
    "fsdp_tp": dt(("SS", 1, 3), ("S", 0)),
    "fsdp_tp_uneven": dt(("S", 1), ("SS", 0, 3)),
    "fsdp_tp_cols": fsdp_tp(0),
    "fsdp_tp_tiny": dt(("SS", 0, 3), ("R",)),
    "shard_then_strided": fsdp_tp(),
    "strided_cols": fsdp_tp(1),
    "strided_both": dt(("SS", 1, 2), ("SS", 0, 2)),
    "shard_shard_tiny": fsdp_tp(),
    "table_past_end": fsdp_tp(1),
}


def check_mapping(rank: int, world_size: int, specs: dict[str, Spec]) -> list[str]:
    """Each key's boxes hold exactly the elements DTensor put there: a tensor
    of global indices, distributed by PyTorch, is cut by tensor_layout into
    boxes, and every box's view must equal that box of the index tensor (and
    live in the local tensor's memory). full_tensor() must give it back."""
    problems = []
    for key, (shape, _, _, layout) in specs.items():
        if layout[0] != "dt":
            continue
        full = torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
        value = place(full, layout)
        assert isinstance(value, DTensor)
        if not torch.equal(value.full_tensor(), full):
            problems.append(f"{key}: full_tensor() is not the distributed tensor")
        local = value.to_local()
        chunks = tensor_layout(key, value).chunks
        if sum(c.box.numel for c in chunks) != local.numel():
            problems.append(f"{key}: boxes hold {[c.box for c in chunks]}, local {local.shape}")
        for chunk in chunks:
            piece = full
            for d, (o, s) in enumerate(zip(chunk.box.offsets, chunk.box.sizes, strict=True)):
                piece = piece.narrow(d, o, s)
            if not torch.equal(chunk.tensor, piece):
                problems.append(f"{key}: box {chunk.box} holds other elements")
            if chunk.tensor.untyped_storage().data_ptr() != local.untyped_storage().data_ptr():
                problems.append(f"{key}: box {chunk.box} is not a view of the local tensor")
    return problems


def boxes_per_rank(rank: int, world_size: int, key: str, specs: dict[str, Spec]) -> int:
    return len(tensor_layout(key, build({key: specs[key]})[key]).chunks)


def test_strided_boxes_are_where_dtensor_puts_the_elements(rank_pool: PoolFactory) -> None:
    pool = rank_pool(4)
    results = pool.run(check_mapping, STRIDED)
    assert results == [[]] * 4
    # the layouts do need several boxes (else the test proves little)
    assert pool.run(boxes_per_rank, "shard_then_strided", STRIDED) == [2] * 4
    assert pool.run(boxes_per_rank, "strided_cols", STRIDED) == [3] * 4


def test_strided_checkpoint_loads_as_plain_and_as_shard(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    assert all(rank_pool(4).run(save_worker, str(tmp_path), STRIDED))
    assert load_plain_here(tmp_path, STRIDED) == []
    on_two = relayout(STRIDED, SHARDED_ON_TWO)
    assert rank_pool(2).run(load_worker, str(tmp_path), on_two) == [[], []]
    assert rank_pool(4).run(load_worker, str(tmp_path), relayout(STRIDED, RESTRIDED)) == [[]] * 4


@pytest.mark.parametrize("source", ["plain", "shard"])
def test_plain_and_shard_checkpoints_load_into_strided_in_place(
    rank_pool: PoolFactory, tmp_path: Path, source: str
) -> None:
    if source == "plain":
        distcp.save(
            build(relayout(STRIDED, dict.fromkeys(STRIDED, PLAIN))),
            checkpoint_id=tmp_path,
            no_dist=True,
        )
    else:
        rank_pool(2).run(save_worker, str(tmp_path), relayout(STRIDED, SHARDED_ON_TWO))
    assert rank_pool(4).run(load_worker, str(tmp_path), STRIDED) == [[]] * 4


# ---------------------------------------------------------------- real FSDP2 over TP


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))


def fsdp_tp_model(mesh: DeviceMesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = tiny_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def fsdp_round_trip(rank: int, world_size: int, path: str) -> tuple[list[str], list[str]]:
    """Save a fully_shard(parallelize_module(model)) on a 2x2 mesh, load it
    into a second such model whose weights were zeroed; returns the placements
    seen and the problems."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = fsdp_tp_model(mesh)
    reference = tiny_model().state_dict()
    problems = []
    placements = []
    for key, param in model.state_dict().items():
        placements.append(f"{key}: {param.placements}")
        if raw(param.full_tensor()) != raw(reference[key]):
            problems.append(f"{key}: full_tensor() differs from the unsharded model")
    distcp.save({"model": model.state_dict()}, checkpoint_id=path)
    other = fsdp_tp_model(mesh)
    with torch.no_grad():
        for param in other.parameters():
            param.to_local().zero_()
    state = {"model": other.state_dict()}
    before = {key: v.to_local().data_ptr() for key, v in state["model"].items()}
    distcp.load(state, checkpoint_id=path)
    for key, value in other.state_dict().items():
        if value.to_local().data_ptr() != before[key]:
            problems.append(f"{key}: not loaded in place")
        if raw(value.to_local()) != raw(model.state_dict()[key].to_local()):
            problems.append(f"{key}: local bytes differ after the load")
    return placements, problems


def test_fully_shard_over_tensor_parallel_round_trips(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    results = rank_pool(4).run(fsdp_round_trip, str(tmp_path))
    for rank, (placements, problems) in enumerate(results):
        assert problems == [], f"rank {rank}"
        assert "0.weight: (_StridedShard(dim=0, sf=2), Shard(dim=0))" in placements, placements
    reference = tiny_model().state_dict()
    target = {"model": {key: torch.zeros_like(v) for key, v in reference.items()}}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    for key, value in reference.items():
        assert raw(target["model"][key]) == raw(value), key


# ---------------------------------------------------------------- ShardedTensor

# Shards as (offsets, sizes, rank): rank 0 holds two, rank 1 one, rank 2 none.
ENUM_A = (((0, 0), (3, 3), 0), ((5, 0), (2, 5), 0), ((0, 3), (3, 2), 1), ((3, 0), (2, 5), 1))
# rank 0 one, rank 1 an empty one (at the end), rank 2 two.
ENUM_B = (((0, 2), (4, 2), 0), ((6, 0), (0, 4), 1), ((0, 0), (4, 2), 2), ((4, 0), (2, 4), 2))
SHARDED: dict[str, Spec] = {
    "enum_a": ((7, 5), torch.float32, 11, ("enum", ENUM_A)),
    "enum_b": ((6, 4), torch.bfloat16, 12, ("enum", ENUM_B)),
    "chunk_rows": ((2, 3), torch.float32, 13, ("chunk", 0)),  # rank 2 gets an empty shard
    "chunk_cols": ((3, 7), torch.bfloat16, 14, ("chunk", 1)),
}
AS_DTENSOR = {
    "enum_a": dt(("S", 0), mesh=(2,)),
    "enum_b": dt(("S", 1), mesh=(2,)),
    "chunk_rows": dt(("S", 0), mesh=(2,)),
    "chunk_cols": dt(("S", 1), mesh=(2,)),
}


def shard_counts(rank: int, world_size: int) -> list[int]:
    return [len(tensor_layout(k, v).chunks) for k, v in build(SHARDED).items()]


def test_enumerable_sharded_tensor_to_dtensor_and_back(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    counts = rank_pool(3).run(shard_counts)
    assert [c[:2] for c in counts] == [[2, 1], [2, 1], [0, 2]]  # zero and several shards
    rank_pool(3).run(save_worker, str(tmp_path / "st"), SHARDED)
    assert load_plain_here(tmp_path / "st", SHARDED) == []
    on_two = relayout(SHARDED, AS_DTENSOR)
    assert rank_pool(2).run(load_worker, str(tmp_path / "st"), on_two) == [[], []]
    rank_pool(2).run(save_worker, str(tmp_path / "dt"), on_two)
    assert rank_pool(3).run(load_worker, str(tmp_path / "dt"), SHARDED) == [[]] * 3


# ---------------------------------------------------------------- errors


def refusals(rank: int, world_size: int, path: str) -> list[tuple[str, str]]:
    """A load into a DTensor whose local tensor is on the meta device, and a
    save of a Partial DTensor: both must fail naming the key."""
    mesh = mesh_of((world_size,))
    full = random_tensor((6, 4), torch.float32, 21)
    distcp.save({"w": place(full, dt(("S", 0), mesh=(world_size,)))}, checkpoint_id=path)
    outcomes = []
    meta = DTensor.from_local(
        torch.empty(3, 4, device="meta"), mesh, [Shard(0)], shape=full.shape, stride=(4, 1)
    )
    partial = DTensor.from_local(torch.ones(6, 4), mesh, [Partial()])
    for action in (
        lambda: distcp.load({"w": meta}, checkpoint_id=path),
        lambda: distcp.save({"p.sum": partial}, checkpoint_id=f"{path}/partial"),
    ):
        try:
            action()
            outcomes.append(("no error", ""))
        except distcp.CheckpointError as error:
            outcomes.append((type(error).__name__, str(error)))
    return outcomes


def test_meta_dtensor_load_and_partial_save_are_refused(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    results = rank_pool(2).run(refusals, str(tmp_path))
    for (meta_type, meta_message), (partial_type, partial_message) in results:
        assert meta_type == "DistributedCheckpointError" and "'w'" in meta_message
        assert "meta" in meta_message
        assert partial_type == "DistributedCheckpointError" and "'p.sum'" in partial_message
        assert "Partial" in partial_message and "reduce" in partial_message
