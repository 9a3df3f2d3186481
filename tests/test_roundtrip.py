"""Single-process round trips: every dtype, odd tensors, nested and non-tensor
values, Stateful objects, in-place loading and dtype casting rules."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import distcp
from bit_patterns import random_tensor, raw
from distcp.dtypes import supported_dtypes

CPU_DTYPES = [d for d in supported_dtypes() if d != torch.float4_e2m1fn_x2]


def save_load(
    tmp_path: Path, saved: dict[str, Any], target: dict[str, Any], **load_kw: Any
) -> None:
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True, **load_kw)


def data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("data-"))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    saved = {"t": random_tensor((3, 5), dtype), "scalar": random_tensor((), dtype)}
    target = {"t": torch.empty(3, 5, dtype=dtype), "scalar": torch.empty((), dtype=dtype)}
    save_load(tmp_path, saved, target)
    assert target["t"].dtype == dtype
    assert raw(target["t"]) == raw(saved["t"])
    assert raw(target["scalar"]) == raw(saved["scalar"])


def test_packed_float4_round_trips(tmp_path: Path) -> None:
    saved = {"t": torch.randint(0, 256, (4, 6), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    target = {"t": torch.empty(4, 6, dtype=torch.float4_e2m1fn_x2)}
    save_load(tmp_path, saved, target)
    assert raw(target["t"]) == raw(saved["t"])


def test_empty_zero_dim_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    saved = {
        "empty": torch.empty(0, 4),
        "zero_dim": torch.tensor(7.5, dtype=torch.float64),
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.tensor([1, 2, 3]).expand(4, 3),
        "conj": torch.tensor([1 + 2j, 3 - 4j]).conj(),
    }
    target = {key: torch.zeros_like(value) for key, value in saved.items()}
    save_load(tmp_path, saved, target)
    for key, value in saved.items():
        assert torch.equal(target[key], value.resolve_conj()), key


def test_views_save_only_their_own_bytes(tmp_path: Path) -> None:
    big = torch.zeros(1 << 20, dtype=torch.float32)  # 4 MiB of storage
    view = big[1000:1010]
    distcp.save({"view": view}, checkpoint_id=tmp_path, no_dist=True)
    assert data_bytes(tmp_path) < 1024
    target = {"view": torch.ones(10)}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["view"], view)


def test_views_sharing_storage_round_trip_separately(tmp_path: Path) -> None:
    base = torch.arange(20, dtype=torch.int64)
    saved = {"first": base[:10], "second": base[5:15], "whole": base}
    target = {
        "first": torch.empty(10, dtype=torch.int64),
        "second": torch.empty(10, dtype=torch.int64),
        "whole": torch.empty(20, dtype=torch.int64),
    }
    save_load(tmp_path, saved, target)
    assert torch.equal(target["first"], base[:10])
    assert torch.equal(target["second"], base[5:15])
    assert torch.equal(target["whole"], base)


def test_load_is_in_place(tmp_path: Path) -> None:
    saved = {"a": torch.randn(4, 4), "nested": {"b": torch.randn(3)}, "layers": [torch.randn(2)]}
    target = {"a": torch.zeros(4, 4), "nested": {"b": torch.zeros(3)}, "layers": [torch.zeros(2)]}
    objects = [target["a"], target["nested"]["b"], target["layers"][0]]
    pointers = [t.data_ptr() for t in objects]
    save_load(tmp_path, saved, target)
    assert [target["a"], target["nested"]["b"], target["layers"][0]] == objects
    assert all(
        x is y
        for x, y in zip(
            objects, [target["a"], target["nested"]["b"], target["layers"][0]], strict=True
        )
    )
    assert [t.data_ptr() for t in objects] == pointers
    assert torch.equal(objects[0], saved["a"]) and torch.equal(objects[1], saved["nested"]["b"])
    assert torch.equal(objects[2], saved["layers"][0])


def test_parameters_and_requires_grad_tensors_load_in_place(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    saved = {"w": module.weight.detach().clone()}
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    fresh = torch.nn.Linear(3, 2)
    target = {"w": fresh.weight}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert target["w"] is fresh.weight and fresh.weight.requires_grad
    assert torch.equal(fresh.weight.detach(), saved["w"])


def test_non_tensor_values_round_trip_with_their_types(tmp_path: Path) -> None:
    values: dict[str, Any] = {
        "int": 3,
        "big": 2**80,
        "float": 0.25,
        "inf": float("inf"),
        "nan": float("nan"),
        "none": None,
        "bool": True,
        "str": "héllo",
        "bytes": b"\x00\xff",
        "tuple": (1, (2, "three")),
        "int_keys": {1: "a", 2: "b"},
        "list": [1, "two", 3.0],
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "np_scalar": np.float32(1.5),
        "complex": 1 + 2j,
        "set": {1, 2, 3},
        "rng": torch.get_rng_state(),
        "empty_dict": {},
    }
    target: dict[str, Any] = {key: None for key in values}
    target["nested"] = {"step": 0}
    saved = {**values, "nested": {"step": 11}}
    save_load(tmp_path, saved, target)
    for key, value in values.items():
        loaded = target[key]
        assert type(loaded) is type(value), key
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(loaded)
        elif isinstance(value, np.ndarray):
            assert loaded.dtype == value.dtype and np.array_equal(loaded, value)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(loaded, value)
        else:
            assert loaded == value, key
    assert target["nested"] == {"step": 11}
    assert isinstance(target["tuple"][1], tuple)
    assert list(target["int_keys"]) == [1, 2]


def test_unsupported_value_is_refused_at_save_naming_the_key(tmp_path: Path) -> None:
    class Custom:
        pass

    with pytest.raises(distcp.UnsupportedValueError, match=r"'extra\.thing'.*allow_pickle"):
        distcp.save({"extra": {"thing": Custom()}}, checkpoint_id=tmp_path, no_dist=True)
    assert not (tmp_path / ".metadata.distcp").exists()


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    def __hash__(self) -> int:
        return self.value


def test_pickle_needs_the_same_opt_in_on_save_and_load(tmp_path: Path) -> None:
    saved = {"obj": Opaque(5), "t": torch.ones(2)}
    distcp.save(
        saved,
        checkpoint_id=tmp_path,
        no_dist=True,
        planner=distcp.DefaultSavePlanner(allow_pickle=True),
    )
    target: dict[str, Any] = {"obj": None, "t": torch.zeros(2)}
    with pytest.raises(distcp.PickleNotAllowedError, match="'obj'"):
        distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    distcp.load(
        target,
        checkpoint_id=tmp_path,
        no_dist=True,
        planner=distcp.DefaultLoadPlanner(allow_pickle=True),
    )
    assert target["obj"] == Opaque(5)


class Counter:
    """A Stateful application object with tensor and non-tensor state."""

    def __init__(self) -> None:
        self.step = 0
        self.history = torch.zeros(3)
        self.loaded_with: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded_with = state_dict
        self.step = state_dict["step"]
        self.history.copy_(state_dict["history"])


def test_stateful_objects_save_and_load_through_their_methods(tmp_path: Path) -> None:
    app = Counter()
    app.step, app.history = 42, torch.tensor([1.0, 2.0, 3.0])
    model = torch.nn.Linear(4, 2)
    distcp.save({"app": app, "model": model}, checkpoint_id=tmp_path, no_dist=True)
    fresh_app, fresh_model = Counter(), torch.nn.Linear(4, 2)
    distcp.load({"app": fresh_app, "model": fresh_model}, checkpoint_id=tmp_path, no_dist=True)
    assert fresh_app.step == 42 and torch.equal(fresh_app.history, app.history)
    assert fresh_app.loaded_with is not None
    for name, value in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], value), name


def test_lossless_widening_is_cast_on_load(tmp_path: Path) -> None:
    saved = {
        "bf16": random_tensor((4, 4), torch.bfloat16),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
    }
    target = {
        "bf16": torch.empty(4, 4, dtype=torch.float32),
        "i8": torch.empty(10, dtype=torch.int32),
    }
    save_load(tmp_path, saved, target)
    assert torch.equal(target["bf16"], saved["bf16"].float())
    assert torch.equal(target["i8"], saved["i8"].int())


def test_lossy_cast_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    saved = {"w": torch.randn(8, 8)}
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    target = {"w": torch.empty(8, 8, dtype=torch.bfloat16)}
    with pytest.raises(
        distcp.DtypeMismatchError, match=r"'w'.*float32.*bfloat16.*allow_dtype_cast"
    ):
        distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    distcp.load(
        target,
        checkpoint_id=tmp_path,
        no_dist=True,
        planner=distcp.DefaultLoadPlanner(allow_dtype_cast=True),
    )
    assert torch.equal(target["w"], saved["w"].bfloat16())


def test_tensor_placeholder_gets_the_whole_saved_tensor(tmp_path: Path) -> None:
    saved = {"w": torch.randn(3, 2)}
    target: dict[str, Any] = {"w": None}
    save_load(tmp_path, saved, target)
    assert isinstance(target["w"], torch.Tensor) and torch.equal(target["w"], saved["w"])


def test_many_threads_and_file_per_item_layouts(tmp_path: Path) -> None:
    saved = {f"t{i}": torch.randn(i + 1, 3) for i in range(12)}
    writer = distcp.FileSystemWriter(tmp_path, thread_count=3, single_file_per_rank=False)
    distcp.save(saved, storage_writer=writer, no_dist=True)
    assert sum(name.startswith("data-") for name in os.listdir(tmp_path)) == 12
    target = {key: torch.empty_like(value) for key, value in saved.items()}
    distcp.load(
        target, storage_reader=distcp.FileSystemReader(tmp_path, thread_count=3), no_dist=True
    )
    assert all(torch.equal(target[k], v) for k, v in saved.items())


def test_checkpoint_id_or_storage_is_required() -> None:
    with pytest.raises(ValueError, match="checkpoint_id"):
        distcp.save({"a": torch.ones(1)}, no_dist=True)
