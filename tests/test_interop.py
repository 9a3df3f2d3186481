"""distcp next to torch DCP: the same state saved by each and loaded by each
comes back identical, and DCP-style code runs unchanged with ``import distcp as dcp``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
LIBRARIES = ["torch.distributed.checkpoint", "distcp"]
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def tensors(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield from tensors(child, f"{path}.{key}")
    elif isinstance(value, DTensor):
        yield path, value.to_local()
    elif isinstance(value, torch.Tensor):
        yield path, value


def differences(a: Any, b: Any) -> list[str]:
    left, right = dict(tensors(a)), dict(tensors(b))
    if left.keys() != right.keys():
        return [f"keys differ: {sorted(left.keys() ^ right.keys())}"]
    return [
        key
        for key in left
        if left[key].dtype != right[key].dtype or raw(left[key]) != raw(right[key])
    ]


def plain_state(fill: bool) -> dict[str, Any]:
    state: dict[str, Any] = {
        str(dtype).removeprefix("torch."): random_tensor((3, 4), dtype, seed)
        for seed, dtype in enumerate(DTYPES)
    }
    state["nested"] = {"deeper": {"scalar": random_tensor((), torch.float32, 50)}}
    state["nested"]["v"] = random_tensor((5,), torch.int64, 51)
    if not fill:
        state = {key: _zeros(value) for key, value in state.items()}
    return state


def _zeros(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _zeros(child) for key, child in value.items()}
    return torch.zeros_like(value)


def save_and_load_with(library: Any, path: Path, saved: Any, fresh: Any, **kw: Any) -> Any:
    library.save(saved, checkpoint_id=str(path), **kw)
    library.load(fresh, checkpoint_id=str(path), **kw)
    return fresh


def test_plain_tensors_round_trip_the_same_in_both_libraries(tmp_path: Path) -> None:
    saved = plain_state(fill=True)
    by_torch = save_and_load_with(
        torch_dcp, tmp_path / "torch", saved, plain_state(fill=False), no_dist=True
    )
    by_distcp = save_and_load_with(
        distcp, tmp_path / "distcp", saved, plain_state(fill=False), no_dist=True
    )
    assert differences(by_torch, saved) == []
    assert differences(by_distcp, by_torch) == []


def dtensor_state(world_size: int, fill: bool) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))

    def shard(full: torch.Tensor, placement: Any) -> DTensor:
        source = full if fill else torch.zeros_like(full)
        return distribute_tensor(source, mesh, [placement], src_data_rank=None)

    return {
        "rows": shard(random_tensor((7, 3), torch.float32, 1), Shard(0)),
        "cols": shard(random_tensor((4, 5), torch.bfloat16, 2), Shard(1)),
        "repl": shard(random_tensor((3,), torch.int64, 3), Replicate()),
        "nested": {"plain": random_tensor((2, 2), torch.float16, 4) if fill else torch.zeros(2, 2)},
    }


def dtensors_both_ways(rank: int, world_size: int, path: str) -> list[list[str]]:
    saved = dtensor_state(world_size, fill=True)
    saved["nested"]["plain"] = saved["nested"]["plain"].half()
    fresh = [dtensor_state(world_size, fill=False) for _ in LIBRARIES]
    for state in fresh:
        state["nested"]["plain"] = state["nested"]["plain"].half()
    by_torch = save_and_load_with(torch_dcp, Path(path) / "torch", saved, fresh[0])
    by_distcp = save_and_load_with(distcp, Path(path) / "distcp", saved, fresh[1])
    return [differences(by_torch, saved), differences(by_distcp, by_torch)]


def test_dtensors_on_two_ranks_round_trip_the_same_in_both_libraries(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    assert rank_pool(2).run(dtensors_both_ways, str(tmp_path)) == [[[], []], [[], []]]


def test_a_torch_dcp_checkpoint_loads_in_place_with_distcp(tmp_path: Path) -> None:
    saved = plain_state(fill=True)
    torch_dcp.save(saved, checkpoint_id=str(tmp_path), no_dist=True)
    fresh = plain_state(fill=False)
    destination = fresh["float32"]
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert differences(fresh, saved) == []
    assert fresh["float32"] is destination


# --- DCP's own test and tutorial code, unchanged but for the import ------------------------------


class MyTestModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_1 = torch.nn.Linear(5, 5)
        self.linear_2 = torch.nn.Linear(5, 1)
        self.emb = torch.nn.EmbeddingBag(5, 10)


def assert_state_dict_equal(state_dict_1: dict[str, Any], state_dict_2: dict[str, Any]) -> None:
    assert len(state_dict_1) == len(state_dict_2), "state_dict must be the same size"
    assert set(state_dict_1.keys()) == set(state_dict_2.keys()), "state_dict keys do not match"
    for key, value_1 in state_dict_1.items():
        value_2 = state_dict_2[key]
        assert torch.equal(value_1, value_2), f"Key {key}'s tensor does not match"


def read_write_only_tensor(dcp: ModuleType, path: str) -> None:
    """torch's ``test_file_system_checkpoint.py::test_read_write_only_tensor``."""
    state_dict_to_save = MyTestModule().state_dict()

    fs_writer = dcp.FileSystemWriter(path=path)
    dcp.save_state_dict(state_dict=state_dict_to_save, storage_writer=fs_writer, no_dist=True)

    state_dict_to_load_to = MyTestModule().state_dict()

    with pytest.raises(AssertionError):
        assert_state_dict_equal(state_dict_to_load_to, state_dict_to_save)

    # Load from file without any resharding
    fs_reader = dcp.FileSystemReader(path=path)
    dcp.load_state_dict(state_dict=state_dict_to_load_to, storage_reader=fs_reader, no_dist=True)

    assert_state_dict_equal(state_dict_to_load_to, state_dict_to_save)


@pytest.mark.parametrize("library", LIBRARIES)
def test_dcp_unit_test_code_runs_unchanged(tmp_path: Path, library: str) -> None:
    read_write_only_tensor(importlib.import_module(library), str(tmp_path))


class ToyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = torch.nn.Linear(16, 16)
        self.relu = torch.nn.ReLU()
        self.net2 = torch.nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


class AppState(Stateful):
    """The tutorial's wrapper: model and optimizer as one Stateful."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
        return {"model": model_state_dict, "optim": optimizer_state_dict}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


def trained(seed: int, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ToyModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model(torch.rand(8, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def tutorial(rank: int, world_size: int, path: str, library: str) -> list[str]:
    """The DCP tutorial's save and load, on every rank, with ``library`` as ``dcp``."""
    dcp = importlib.import_module(library)
    model, optimizer = trained(seed=0, lr=0.1)
    state_dict = {"app": AppState(model, optimizer)}
    dcp.save(state_dict, checkpoint_id=path)

    fresh_model, fresh_optimizer = trained(seed=1, lr=0.5)
    state_dict = {"app": AppState(fresh_model, fresh_optimizer)}
    dcp.load(state_dict=state_dict, checkpoint_id=path)

    expected = {"model": model.state_dict(), "optim": optimizer.state_dict()["state"]}
    got = {"model": fresh_model.state_dict(), "optim": fresh_optimizer.state_dict()["state"]}
    problems = differences(_str_keys(got), _str_keys(expected))
    if fresh_optimizer.param_groups[0]["lr"] != 0.1:
        problems.append("param_groups")
    return problems


def _str_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _str_keys(child) for key, child in value.items()}
    return value


@pytest.mark.parametrize("library", LIBRARIES)
def test_dcp_tutorial_code_runs_unchanged_on_two_ranks(
    rank_pool: PoolFactory, tmp_path: Path, library: str
) -> None:
    assert rank_pool(2).run(tutorial, str(tmp_path), library) == [[], []]
