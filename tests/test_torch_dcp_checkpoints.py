"""Checkpoints written by torch DCP itself (``torch.distributed.checkpoint.save``,
in one process and on two gloo ranks) load with ``distcp.load``: into other
layouts and world sizes, bit for bit, into the caller's own tensors."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch import nn
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner as TorchDefaultLoadPlanner,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.testing import RankPool
from distcp.value_codec import decode_value

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

PoolFactory = Callable[[int], RankPool]

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]

VALUES: dict[str, Any] = {
    "by_id": {0: "a", 1: "b"},  # torch saves by_id.0 and by_id.1: distcp rebuilds the dict
    "groups": [{"lr": 0.1, "params": ["w", "b"]}, {"lr": 0.2, "params": []}],  # likewise
    "step": 1234,
    "lr": 3e-4,
    "name": "run-7 ✓",
    "flags": [True, None, 2, "three", 4.5],
    "betas": (0.9, 0.999),
}


def shaped(value: Any) -> Any:
    """A placeholder for ``value`` to load into: its containers, None for the rest
    (as a fresh optimizer's ``param_groups`` is for a saved one)."""
    if isinstance(value, dict):
        return {key: shaped(child) for key, child in value.items()}
    if isinstance(value, list):
        return [shaped(child) for child in value]
    return None


def torch_save(state: dict[str, Any], path: Path | str, **kw: Any) -> None:
    """Save with torch DCP in this process (no process group)."""
    torch_dcp.save(state, checkpoint_id=str(path), no_dist=True, **kw)


def tensor_state(fill: bool) -> dict[str, Any]:
    def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        source = random_tensor(shape, dtype, seed)
        return source if fill else torch.zeros_like(source)

    state: dict[str, Any] = {
        str(dtype).removeprefix("torch."): make((3, 5), dtype, seed)
        for seed, dtype in enumerate(DTYPES)
    }
    state["scalar"] = make((), torch.float32, 90)
    state["empty"] = make((0, 4), torch.float32, 91)
    state["nested"] = {
        "deeper": {"w": make((2, 3, 4), torch.float16, 92)},
        "v": make((6,), torch.int64, 93),
    }
    return state


def leaves(value: Any, path: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, dict):
        out: dict[str, torch.Tensor] = {}
        for key, child in value.items():
            out.update(leaves(child, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, DTensor):
        return {path: value.to_local()}
    return {path: value} if isinstance(value, torch.Tensor) else {}


def differences(loaded: Any, expected: Any) -> list[str]:
    got, want = leaves(loaded), leaves(expected)
    if got.keys() != want.keys():
        return [f"keys differ: {sorted(got.keys() ^ want.keys())}"]
    return [
        key
        for key in want
        if got[key].dtype != want[key].dtype
        or got[key].shape != want[key].shape
        or raw(got[key]) != raw(want[key])
    ]


def pointers(state: Any, path: str = "") -> dict[str, tuple[int, int]]:
    """Each tensor leaf's identity and memory (a DTensor's local shard's), to
    prove a load filled it in place."""
    if isinstance(state, dict):
        out: dict[str, tuple[int, int]] = {}
        for key, child in state.items():
            out.update(pointers(child, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(state, DTensor):
        return {path: (id(state), state.to_local().data_ptr())}
    return {path: (id(state), state.data_ptr())} if isinstance(state, torch.Tensor) else {}


# --- one process -------------------------------------------------------------------------------


def test_every_dtype_loads_bit_exact_into_the_callers_tensors(tmp_path: Path) -> None:
    saved = tensor_state(fill=True)
    torch_save(saved, tmp_path)
    assert (tmp_path / ".metadata").is_file() and not (tmp_path / ".metadata.distcp").exists()
    fresh = tensor_state(fill=False)
    before = pointers(fresh)
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert differences(fresh, saved) == []
    assert pointers(fresh) == before


def test_both_entry_points_and_the_old_one_read_a_torch_checkpoint(tmp_path: Path) -> None:
    saved = {"w": random_tensor((4, 4), torch.float32, 1), "extra": dict(VALUES)}
    torch_save(saved, tmp_path)
    for load in (
        lambda sd: distcp.load(sd, checkpoint_id=str(tmp_path), no_dist=True),
        lambda sd: distcp.load(sd, storage_reader=distcp.FileSystemReader(tmp_path), no_dist=True),
        lambda sd: distcp.load_state_dict(sd, distcp.FileSystemReader(tmp_path), no_dist=True),
    ):
        fresh: dict[str, Any] = {"w": torch.zeros(4, 4), "extra": shaped(VALUES)}
        load(fresh)
        assert differences(fresh, saved) == []
        assert fresh["extra"] == VALUES


def test_byte_values_keep_their_types_as_torch_dcp_itself_loads_them(tmp_path: Path) -> None:
    # (torch DCP itself turns the int keys of a mapping into strings: not compared with it)
    values = {key: value for key, value in VALUES.items() if key != "by_id"}
    torch_save({"values": values, "t": torch.arange(3)}, tmp_path)
    by_distcp: dict[str, Any] = {"values": shaped(values), "t": torch.zeros(3, dtype=torch.int64)}
    by_torch: dict[str, Any] = {"values": shaped(values), "t": torch.zeros(3, dtype=torch.int64)}
    distcp.load(by_distcp, checkpoint_id=tmp_path, no_dist=True)
    torch_dcp.load(by_torch, checkpoint_id=str(tmp_path), no_dist=True)
    assert by_distcp["values"] == by_torch["values"] == values
    for key, value in values.items():
        assert type(by_distcp["values"][key]) is type(value), key
    assert torch.equal(by_distcp["t"], torch.arange(3))


def test_containers_torch_split_into_parts_come_back_whole(tmp_path: Path) -> None:
    groups = [{"lr": 0.5, "betas": (0.9, 0.99), "params": ["a.w"]}, {}, {"lr": 0.1, "params": []}]
    torch_save({"g": groups, "by_id": {0: "x", 7: "y"}, "w": torch.ones(1)}, tmp_path)
    # distcp keeps a tensor-free list, or int-keyed mapping, whole: torch saved it in parts
    for placeholder in (None, shaped(groups)):
        state: dict[str, Any] = {"g": placeholder, "by_id": {0: None, 7: None}}
        distcp.load(
            state,
            checkpoint_id=tmp_path,
            planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )
        assert state == {"g": groups, "by_id": {0: "x", 7: "y"}}
        assert type(state["g"][0]["betas"]) is tuple
    # without a placeholder that has them, the keys stay the strings torch saved
    state = {"by_id": None}
    distcp.load(
        state,
        checkpoint_id=tmp_path,
        planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
        no_dist=True,
    )
    assert state == {"by_id": {"0": "x", "7": "y"}}


class RecordingTorchPlanner(TorchDefaultLoadPlanner):
    """torch's own planner, keeping the bytes storage hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, bytes] = {}

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.received[read_item.dest_index.fqn] = value.getvalue()
        value.seek(0)
        super().load_bytes(read_item, value)


class RecordingDistcpPlanner(distcp.DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__()
        self.received: dict[str, bytes] = {}

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.received[read_item.dest_index.fqn] = value.getvalue()
        super().load_bytes(read_item, value)


def test_each_planner_gets_byte_values_in_its_own_encoding(tmp_path: Path) -> None:
    torch_save({"w": torch.ones(2), "step": 7, "names": ["x", "y"]}, tmp_path)
    torch_planner = RecordingTorchPlanner()
    state: dict[str, Any] = {"w": torch.zeros(2), "step": 0, "names": None}
    distcp.load(state, checkpoint_id=tmp_path, planner=torch_planner, no_dist=True)
    assert state == {"w": state["w"], "step": 7, "names": ["x", "y"]}
    assert torch.equal(state["w"], torch.ones(2))
    # torch's planner gets what torch's reader would give it: the torch.save archive
    assert all(data.startswith(b"PK\x03\x04") for data in torch_planner.received.values())
    assert torch.load(io.BytesIO(torch_planner.received["step"]), weights_only=True) == 7

    distcp_planner = RecordingDistcpPlanner()
    state = {"w": torch.zeros(2), "step": 0, "names": None}
    distcp.load(state, checkpoint_id=tmp_path, planner=distcp_planner, no_dist=True)
    assert state["step"] == 7 and state["names"] == ["x", "y"]
    # distcp's planner gets distcp's value encoding, never a pickle
    assert not any(data.startswith(b"PK") for data in distcp_planner.received.values())
    assert decode_value(distcp_planner.received["names"], key="names") == ["x", "y"]


class Point:
    """A value only pickle can save (torch.load(weights_only=True) refuses it)."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and other.x == self.x

    __hash__ = None  # type: ignore[assignment]


def test_a_pickled_object_value_needs_the_callers_explicit_opt_in(tmp_path: Path) -> None:
    torch_save({"p": Point(3), "w": torch.ones(1)}, tmp_path)
    with pytest.raises(distcp.PickleNotAllowedError, match=r"'p'.*allow_pickle=True"):
        distcp.load({"p": None, "w": torch.zeros(1)}, checkpoint_id=tmp_path, no_dist=True)
    state: dict[str, Any] = {"p": None, "w": torch.zeros(1)}
    planner = distcp.DefaultLoadPlanner(allow_pickle=True)
    distcp.load(state, checkpoint_id=tmp_path, planner=planner, no_dist=True)
    assert state["p"] == Point(3)


def test_a_partial_load_reads_only_the_requested_items(tmp_path: Path) -> None:
    saved = {f"layer{i}": random_tensor((64, 64), torch.float32, i) for i in range(8)}
    torch_save(saved, tmp_path)
    reader = distcp.FileSystemReader(tmp_path)
    fresh = {"layer3": torch.zeros(64, 64)}
    distcp.load(
        fresh,
        storage_reader=reader,
        planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
        no_dist=True,
    )
    assert raw(fresh["layer3"]) == raw(saved["layer3"])
    metadata = reader.read_metadata()
    one_item = next(
        info.length for index, info in metadata.storage_data.items() if index.fqn == "layer3"
    )
    assert reader.report.items == 1 and reader.report.bytes_read == one_item


def test_a_lossless_widening_is_cast_and_a_lossy_cast_refused(tmp_path: Path) -> None:
    saved = random_tensor((3, 3), torch.bfloat16, 5)
    torch_save({"w": saved, "x": torch.ones(2)}, tmp_path)
    wide = {"w": torch.zeros(3, 3, dtype=torch.float32)}
    distcp.load(
        wide,
        checkpoint_id=tmp_path,
        planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
        no_dist=True,
    )
    assert torch.equal(wide["w"], saved.float())
    with pytest.raises(distcp.DtypeMismatchError, match="'x'"):
        distcp.load(
            {"x": torch.zeros(2, dtype=torch.float16)},
            checkpoint_id=tmp_path,
            planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
            no_dist=True,
        )


def test_a_tensor_requested_without_a_destination_is_loaded_whole(tmp_path: Path) -> None:
    saved = random_tensor((2, 5), torch.int32, 8)
    torch_save({"w": saved}, tmp_path)
    state: dict[str, Any] = {"w": None}
    distcp.load(state, checkpoint_id=tmp_path, no_dist=True)
    assert raw(state["w"]) == raw(saved)


def test_distcp_metadata_wins_over_a_torch_metadata_in_the_same_directory(tmp_path: Path) -> None:
    torch_save({"w": torch.full((3,), 1.0)}, tmp_path)
    distcp.save({"w": torch.full((3,), 2.0)}, checkpoint_id=tmp_path, no_dist=True)
    fresh = {"w": torch.zeros(3)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(fresh["w"], torch.full((3,), 2.0))


def test_a_text_metadata_marker_alone_is_not_taken_for_torch_dcp(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_text("# distcp checkpoint: see .metadata.distcp\n")
    with pytest.raises(distcp.IncompleteCheckpointError):
        distcp.load({"w": torch.zeros(1)}, checkpoint_id=tmp_path, no_dist=True)


class Reversed(StreamTransformExtension):
    """A stand-in for a torch DCP extension distcp does not know (zstd in practice)."""

    @staticmethod
    def registry_name() -> str:
        return "test.reversed"

    @staticmethod
    def from_descriptor(version: str) -> Reversed:
        return Reversed()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return output

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return input


def test_an_unknown_torch_dcp_extension_is_refused_naming_it(tmp_path: Path) -> None:
    writer = torch_dcp.FileSystemWriter(str(tmp_path), _extensions=[Reversed()])
    torch_dcp.save({"w": torch.ones(4)}, storage_writer=writer, no_dist=True)
    with pytest.raises(distcp.UnsupportedStorageError, match=r"'w'.*test\.reversed/1"):
        distcp.load({"w": torch.zeros(4)}, checkpoint_id=tmp_path, no_dist=True)
    # torch's own reader, passed to distcp.load, still reads it
    registry = ExtensionRegistry()
    registry.register(Reversed)
    fresh = {"w": torch.zeros(4)}
    distcp.load(
        fresh,
        storage_reader=torch_dcp.FileSystemReader(str(tmp_path), _extension_registry=registry),
        no_dist=True,
    )
    assert torch.equal(fresh["w"], torch.ones(4))


# --- two ranks ---------------------------------------------------------------------------------


def full_tensors() -> dict[str, torch.Tensor]:
    return {
        "rows": random_tensor((7, 3), torch.float32, 11),
        "cols": random_tensor((4, 5), torch.bfloat16, 12),
        "repl": random_tensor((6,), torch.int64, 13),
        "plain": random_tensor((2, 2), torch.float16, 14),
    }


def sharded(
    full: dict[str, torch.Tensor], placements: dict[str, Any], fill: bool
) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    state: dict[str, Any] = {
        key: distribute_tensor(
            tensor if fill else torch.zeros_like(tensor),
            mesh,
            [placements[key]],
            src_data_rank=None,
        )
        for key, tensor in full.items()
        if key in placements
    }
    state["nested"] = {
        "plain": full["plain"].clone() if fill else torch.zeros_like(full["plain"]),
        "meta": dict(VALUES) if fill else shaped(VALUES),
    }
    return state


SAVED_AS = {"rows": Shard(0), "cols": Shard(1), "repl": Replicate()}
LOADED_AS = {"rows": Shard(1), "cols": Shard(0), "repl": Shard(0)}


def torch_saves_sharded_distcp_loads_resharded(rank: int, world_size: int, path: str) -> list[str]:
    full = full_tensors()
    torch_dcp.save(sharded(full, SAVED_AS, fill=True), checkpoint_id=path)
    fresh = sharded(full, LOADED_AS, fill=False)
    objects = {key: id(fresh[key]) for key in LOADED_AS}
    before = pointers(fresh)
    distcp.load(fresh, checkpoint_id=path)
    problems = [f"{key} replaced" for key in LOADED_AS if id(fresh[key]) != objects[key]]
    problems += [f"{key} not in place" for key in before if pointers(fresh)[key] != before[key]]
    for key in LOADED_AS:
        if raw(fresh[key].full_tensor()) != raw(full[key]):
            problems.append(f"{key} differs")
    if fresh["nested"]["meta"] != VALUES or raw(fresh["nested"]["plain"]) != raw(full["plain"]):
        problems.append("nested differs")
    return problems


def test_two_ranks_to_another_sharding_and_to_one_process(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    assert rank_pool(2).run(torch_saves_sharded_distcp_loads_resharded, str(tmp_path)) == [[], []]
    full = full_tensors()
    fresh: dict[str, Any] = {
        key: torch.zeros_like(tensor) for key, tensor in full.items() if key != "plain"
    }
    fresh["nested"] = {
        "plain": torch.zeros(2, 2, dtype=torch.float16),
        "meta": shaped(VALUES),
    }
    before = pointers(fresh)
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    expected = {key: tensor for key, tensor in full.items() if key != "plain"}
    expected["nested"] = {"plain": full["plain"]}
    assert differences(fresh, expected) == []
    assert fresh["nested"]["meta"] == VALUES
    assert pointers(fresh) == before


def distcp_loads_one_process_checkpoint(rank: int, world_size: int, path: str) -> list[str]:
    full = full_tensors()
    fresh = sharded(full, {"rows": Shard(0), "cols": Shard(1), "repl": Replicate()}, fill=False)
    before = pointers(fresh)
    distcp.load(fresh, checkpoint_id=path)
    problems = [
        key for key in ("rows", "cols", "repl") if raw(fresh[key].full_tensor()) != raw(full[key])
    ]
    return problems + [
        f"{key} not in place" for key in before if pointers(fresh)[key] != before[key]
    ]


def test_one_process_to_two_ranks(rank_pool: PoolFactory, tmp_path: Path) -> None:
    saved: dict[str, Any] = {
        key: tensor for key, tensor in full_tensors().items() if key != "plain"
    }
    saved["nested"] = {"plain": full_tensors()["plain"], "meta": dict(VALUES)}
    torch_save(saved, tmp_path)
    assert rank_pool(2).run(distcp_loads_one_process_checkpoint, str(tmp_path)) == [[], []]


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = nn.Linear(6, 10)
        self.outer = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.relu(self.inner(x)))


def trained(model: nn.Module, seed: int) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    model(torch.randn(4, 6, generator=generator)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


def fsdp2(model: Net) -> Net:
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    fully_shard(model.inner, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


FULL = StateDictOptions(full_state_dict=True)


def full_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer, options=FULL)
    state = {"model": model_state, "optim": optim_state}
    tensors = {key: raw(tensor) for key, tensor in leaves(state).items()}
    return {"tensors": tensors, "groups": optim_state["param_groups"]}


def fsdp2_torch_save_distcp_load(rank: int, world_size: int, path: str) -> dict[str, Any]:
    model = fsdp2(Net(seed=0))
    optimizer = trained(model, seed=1)
    model_state, optim_state = get_state_dict(model, optimizer)
    torch_dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    expected = full_bytes(model, optimizer)

    other = fsdp2(Net(seed=5))
    other_optimizer = trained(other, seed=6)
    model_state, optim_state = get_state_dict(other, other_optimizer)
    target = {"model": model_state, "optim": optim_state}
    before = pointers(target)
    distcp.load(target, checkpoint_id=path)
    in_place = pointers(target) == before
    set_state_dict(
        other, other_optimizer, model_state_dict=model_state, optim_state_dict=optim_state
    )
    return {
        "expected": expected,
        "loaded": full_bytes(other, other_optimizer),
        "in_place": in_place,
    }


def test_fsdp2_model_and_optimizer_on_two_ranks_load_on_two_and_in_one_process(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    results = rank_pool(2).run(fsdp2_torch_save_distcp_load, str(tmp_path))
    expected = results[0]["expected"]
    for result in results:
        assert result["in_place"]
        assert result["loaded"] == expected
    # the same checkpoint, in one process, into a model that is not sharded at all
    model = Net(seed=9)
    optimizer = trained(model, seed=10)
    model_state, optim_state = get_state_dict(model, optimizer)
    distcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=tmp_path, no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    assert full_bytes(model, optimizer) == expected
    assert expected["tensors"]  # the comparison compared something
