"""distcp.format_utils (torch DCP's twin) and the streaming converter.

Bit-exact round trips distcp → torch.save → distcp and torch.save → distcp →
torch.save with every kind of value; a sharded (2-rank) checkpoint written as
full tensors; BroadcastingTorchSaveReader + DynamicMetaLoadPlanner loading a
torch.save file into DTensors on 2 ranks, reading the file on rank 0 only;
streaming re-encoding with bounded peak memory (measured in a subprocess);
typed errors for bad sources and existing destinations.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint.format_utils as torch_format_utils
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp import format_utils
from distcp.convert import (
    BroadcastingTorchSaveReader,
    DynamicMetaLoadPlanner,
    FullStateLoadPlanner,
    convert_to_distcp,
    nest_state_dict,
)
from distcp.flatten import flatten_state_dict
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


def assert_same(expected: Any, actual: Any, where: str = "") -> None:
    """Equal values of the same types, tensors bit for bit (dtype and shape too)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert raw(actual) == raw(expected), f"{where}: bytes differ"
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for n, (a, b) in enumerate(zip(expected, actual, strict=True)):
            assert_same(a, b, f"{where}[{n}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def full_state(path: Path) -> dict[str, Any]:
    """Everything in the distcp checkpoint at ``path``, nested."""
    planner = FullStateLoadPlanner()
    distcp.load({}, checkpoint_id=path, planner=planner, no_dist=True)
    return planner.nested_state_dict()


def sample_state() -> dict[str, Any]:
    """Tensors of many dtypes and shapes (random bit patterns: NaNs, -0.0) and
    values of every plain kind, nested in dicts and lists."""
    return {
        "model": {
            "layer.weight": random_tensor((5, 3), torch.float32, 1),
            "bias": random_tensor((3,), torch.bfloat16, 2),
            "mask": random_tensor((4,), torch.bool, 3),
            "ids": random_tensor((2, 2), torch.int64, 4),
            "phase": random_tensor((3,), torch.complex64, 5),
            "f8": random_tensor((4,), torch.float8_e4m3fn, 6),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros((0, 4), dtype=torch.float16),
        },
        "layers": [random_tensor((2,), torch.float32, 7), random_tensor((3,), torch.int8, 8)],
        "sparse_ids": {3: random_tensor((2,), torch.int32, 9), 7: torch.tensor([1, 2])},
        "step": 1234,
        "lr": 0.125,
        "name": "run-7 ü",
        "flags": [True, None, "x", 3],
        "shape": (3, 4),
        "extra": {"nested": {"deep": [1, 2, {"k": "v"}]}, "empty": {}},
    }


# --------------------------------------------------------------------------- the twin


def test_public_names_and_signatures_are_torchs() -> None:
    assert sorted(format_utils.__all__) == sorted(torch_format_utils.__all__)
    for name in torch_format_utils.__all__:
        ours, theirs = getattr(format_utils, name), getattr(torch_format_utils, name)
        ours_params = list(inspect.signature(ours).parameters)
        theirs_params = list(inspect.signature(theirs).parameters)
        assert ours_params[: len(theirs_params)] == theirs_params, name


def test_distcp_to_torch_save_to_distcp_is_bit_exact(tmp_path: Path) -> None:
    state = sample_state()
    distcp.save(state, checkpoint_id=tmp_path / "a", no_dist=True)

    format_utils.dcp_to_torch_save(tmp_path / "a", tmp_path / "a.pt")
    from_file = torch.load(tmp_path / "a.pt", weights_only=True)
    assert_same(state, from_file)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.pt")]  # no temporary

    format_utils.torch_save_to_dcp(tmp_path / "a.pt", tmp_path / "b")
    assert_same(state, full_state(tmp_path / "b"))
    assert_same(full_state(tmp_path / "a"), full_state(tmp_path / "b"))


def test_torch_save_to_distcp_to_torch_save_is_bit_exact(tmp_path: Path) -> None:
    state = sample_state()
    state["model"]["transposed"] = random_tensor((3, 4), torch.float32, 10).t()
    torch.save(state, tmp_path / "in.pt")

    format_utils.torch_save_to_dcp(tmp_path / "in.pt", tmp_path / "ckpt")
    format_utils.dcp_to_torch_save(tmp_path / "ckpt", tmp_path / "out.pt")
    assert_same(state, torch.load(tmp_path / "out.pt", weights_only=True))


def test_torch_save_to_dcp_reads_legacy_format_and_replaces(tmp_path: Path) -> None:
    old = {"w": torch.arange(6.0)}
    new = {"w": torch.arange(4), "v": "new"}
    torch.save(old, tmp_path / "old.pt")
    torch.save(new, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    format_utils.torch_save_to_dcp(tmp_path / "old.pt", tmp_path / "ckpt")
    format_utils.torch_save_to_dcp(tmp_path / "legacy.pt", tmp_path / "ckpt")  # not mappable
    assert_same(new, full_state(tmp_path / "ckpt"))


def _save_sharded(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    rows = distribute_tensor(random_tensor((7, 3), torch.float32, 1), mesh, [Shard(0)])
    cols = distribute_tensor(random_tensor((3, 10), torch.bfloat16, 2), mesh, [Shard(1)])
    state = {"model": {"rows": rows, "cols": cols}, "optim": {"step": 5}}
    distcp.save(state, checkpoint_id=path)


def test_sharded_checkpoint_becomes_full_tensors(tmp_path: Path, rank_pool: PoolFactory) -> None:
    rank_pool(2).run(_save_sharded, str(tmp_path / "sharded"))
    format_utils.dcp_to_torch_save(tmp_path / "sharded", tmp_path / "full.pt")
    expected = {
        "model": {
            "rows": random_tensor((7, 3), torch.float32, 1),
            "cols": random_tensor((3, 10), torch.bfloat16, 2),
        },
        "optim": {"step": 5},
    }
    assert_same(expected, torch.load(tmp_path / "full.pt", weights_only=True))


def test_nesting_rule_for_int_steps() -> None:
    paths = {
        "a.0": ["a", 0],
        "a.1": ["a", 1],
        "b.2": ["b", 2],
        "b.x": ["b", "x"],
        "c.1": ["c", 1],
        "flat.key": ["flat.key"],
    }
    flat = {key: n for n, key in enumerate(paths)} | {"no_path": "v"}
    assert nest_state_dict(flat, paths) == {
        "a": [0, 1],
        "b": {2: 2, "x": 3},
        "c": {1: 4},  # not 0 … n-1: a dict with its int key
        "flat.key": 5,
        "no_path": "v",
    }
    with pytest.raises(distcp.CheckpointFormatError, match=re.escape("'a.0.z'")):
        nest_state_dict({"a.0": 1, "a.0.z": 2}, {"a.0": ["a", 0], "a.0.z": ["a", 0, "z"]})
    with pytest.raises(distcp.CheckpointFormatError, match="'k'"):
        nest_state_dict({"k": 1}, {"k": [0, "x"]})


def test_full_state_planner_loads_a_subset(tmp_path: Path) -> None:
    distcp.save(sample_state(), checkpoint_id=tmp_path / "c", no_dist=True)
    planner = FullStateLoadPlanner(keys=["step", "model.bias"])
    distcp.load({}, checkpoint_id=tmp_path / "c", planner=planner, no_dist=True)
    assert_same(
        {"model": {"bias": random_tensor((3,), torch.bfloat16, 2)}, "step": 1234},
        planner.nested_state_dict(),
    )
    with pytest.raises(distcp.KeyMismatchError, match="nope"):
        distcp.load(
            {}, checkpoint_id=tmp_path / "c", planner=FullStateLoadPlanner(["nope"]), no_dist=True
        )
    with pytest.raises(distcp.CheckpointError, match="empty dict") as caught:
        distcp.load(
            {"x": 1}, checkpoint_id=tmp_path / "c", planner=FullStateLoadPlanner(), no_dist=True
        )
    assert isinstance(caught.value.__cause__, ValueError)


# --------------------------------------------------------------------------- errors


class NotAllowed:
    """A class torch.load(weights_only=True) refuses to build."""


def test_errors_for_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointNotFoundError):
        format_utils.dcp_to_torch_save(tmp_path / "missing", tmp_path / "x.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(distcp.IncompleteCheckpointError):
        format_utils.dcp_to_torch_save(tmp_path / "empty_dir", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()

    with pytest.raises(distcp.CheckpointNotFoundError):
        format_utils.torch_save_to_dcp(tmp_path / "missing.pt", tmp_path / "out")
    with pytest.raises(distcp.CheckpointNotFoundError, match="directory"):
        format_utils.torch_save_to_dcp(tmp_path / "empty_dir", tmp_path / "out")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch.save file" * 10)
    with pytest.raises(distcp.CheckpointFormatError, match=re.escape("garbage.pt")):
        format_utils.torch_save_to_dcp(tmp_path / "garbage.pt", tmp_path / "out")
    torch.save({"obj": NotAllowed()}, tmp_path / "unsafe.pt")
    with pytest.raises(distcp.PickleNotAllowedError, match=re.escape("unsafe.pt")):
        format_utils.torch_save_to_dcp(tmp_path / "unsafe.pt", tmp_path / "out")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(distcp.CheckpointFormatError, match="list"):
        format_utils.torch_save_to_dcp(tmp_path / "list.pt", tmp_path / "out")
    torch.save({1: torch.ones(2)}, tmp_path / "intkey.pt")
    with pytest.raises(distcp.CheckpointFormatError, match="strings"):
        format_utils.torch_save_to_dcp(tmp_path / "intkey.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_errors(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointNotFoundError):
        convert_to_distcp(tmp_path / "missing", tmp_path / "dst")
    (tmp_path / "not_ckpt").mkdir()
    with pytest.raises(distcp.IncompleteCheckpointError):
        convert_to_distcp(tmp_path / "not_ckpt", tmp_path / "dst")

    distcp.save({"w": torch.ones(3)}, checkpoint_id=tmp_path / "src", no_dist=True)
    distcp.save({"old": torch.zeros(2)}, checkpoint_id=tmp_path / "dst", no_dist=True)
    with pytest.raises(distcp.CheckpointExistsError, match="overwrite"):
        convert_to_distcp(tmp_path / "src", tmp_path / "dst")
    assert_same({"old": torch.zeros(2)}, full_state(tmp_path / "dst"))  # untouched
    convert_to_distcp(tmp_path / "src", tmp_path / "dst", overwrite=True)
    assert_same({"w": torch.ones(3)}, full_state(tmp_path / "dst"))

    with pytest.raises(distcp.CheckpointError, match="itself"):
        convert_to_distcp(tmp_path / "src", tmp_path / "src", overwrite=True)
    from torch.distributed.checkpoint.state_dict_saver import save as torch_dcp_save

    torch_dcp_save({"x": torch.ones(1)}, checkpoint_id=tmp_path / "torch_dst", no_dist=True)
    with pytest.raises(distcp.CheckpointExistsError, match="torch DCP"):
        convert_to_distcp(tmp_path / "src", tmp_path / "torch_dst", overwrite=True)
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(distcp.CheckpointExistsError, match="not a directory"):
        convert_to_distcp(tmp_path / "src", tmp_path / "a_file")


def test_converter_refuses_a_corrupt_source(tmp_path: Path) -> None:
    distcp.save({"w": torch.arange(1000.0)}, checkpoint_id=tmp_path / "src", no_dist=True)
    (data,) = [p for p in (tmp_path / "src").iterdir() if p.name.startswith("data-")]
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[100] ^= 0xFF
    data.write_bytes(bytes(raw_bytes))
    with pytest.raises(distcp.CorruptCheckpointError):
        convert_to_distcp(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst" / ".metadata.distcp").exists()  # nothing committed


# --------------------------------------------------------------------------- streaming


def test_reencode_keeps_values_chunks_and_paths(tmp_path: Path, rank_pool: PoolFactory) -> None:
    rank_pool(2).run(_save_sharded, str(tmp_path / "sharded"))
    distcp.save(sample_state(), checkpoint_id=tmp_path / "plain", no_dist=True)
    for name in ("sharded", "plain"):
        source, target = tmp_path / name, tmp_path / f"{name}-copy"
        metadata = convert_to_distcp(source, target)
        before = distcp.FileSystemReader(source).read_metadata()
        after = distcp.FileSystemReader(target).read_metadata()
        assert after.state_dict_metadata == before.state_dict_metadata  # keys, chunks, dtypes
        assert metadata.state_dict_metadata == before.state_dict_metadata
        assert_same(full_state(source), full_state(target))
    assert list(after.state_dict_metadata) == list(flatten_state_dict(sample_state())[0])
    rows = distcp.FileSystemReader(tmp_path / "sharded-copy").read_metadata()
    entry = rows.state_dict_metadata["model.rows"]
    assert isinstance(entry, distcp.TensorStorageMetadata)
    assert len(entry.chunks) == 2  # the 2 ranks' shards


MEMORY_SCRIPT = r"""
import json, sys
import torch
from distcp.convert import convert_to_distcp
from distcp.format_utils import dcp_to_torch_save

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

mode, source, target = sys.argv[1:]
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
before = status("VmRSS")
if status("VmHWM") > before + (4 << 20):
    raise SystemExit("VmHWM was not reset")
if mode == "stream":
    convert_to_distcp(source, target)
else:
    dcp_to_torch_save(source, target)
print(json.dumps({"extra": status("VmHWM") - before}))
"""


def _peak_extra(mode: str, source: Path, target: Path) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, mode, str(source), str(target)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout.strip().splitlines()[-1])["extra"])


def test_streaming_peak_memory_is_a_few_chunks(tmp_path: Path) -> None:
    count, largest = 8, 16 * MiB
    state: dict[str, Any] = {f"w{n}": torch.full((largest // 4,), float(n)) for n in range(count)}
    state["meta"] = {"step": 3, "names": ["a", "b"]}
    distcp.save(state, checkpoint_id=tmp_path / "src", no_dist=True)
    del state

    extra = _peak_extra("stream", tmp_path / "src", tmp_path / "dst")
    # FileSystemWriter keeps up to three items alive at once (the one being
    # resolved, the one to write next, and a reference to the one just written);
    # the whole state would be 8x.
    assert extra < 2.5 * largest, f"peak extra {extra / MiB:.1f} MiB"
    loaded: dict[str, Any] = {f"w{n}": torch.empty(largest // 4) for n in range(count)}
    loaded["meta"] = {"step": 0, "names": None}
    distcp.load(loaded, checkpoint_id=tmp_path / "dst", no_dist=True)
    assert all(bool((loaded[f"w{n}"] == n).all()) for n in range(count))
    assert loaded["meta"] == {"step": 3, "names": ["a", "b"]}


def test_dcp_to_torch_save_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    count, size = 4, 16 * MiB
    state = {"model": {f"w{n}": torch.full((size // 4,), float(n)) for n in range(count)}}
    distcp.save(state, checkpoint_id=tmp_path / "src", no_dist=True)
    del state
    extra = _peak_extra("torch_save", tmp_path / "src", tmp_path / "out.pt")
    assert extra < size + 8 * MiB, f"peak extra {extra / MiB:.1f} MiB for 4 × 16 MiB"
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(loaded["model"]) == [f"w{n}" for n in range(count)]
    assert all(bool((loaded["model"][f"w{n}"] == n).all()) for n in range(count))


# --------------------------------------------------------------------------- broadcasting reader


def _file_state() -> dict[str, Any]:
    return {
        "model": {
            "w": random_tensor((9, 4), torch.float32, 11),
            "b": random_tensor((4,), torch.bfloat16, 12),
            "mask": random_tensor((5, 2), torch.bool, 13),
        },
        "step": 42,
        "name": "from-file",
        "unused": torch.ones(3),
    }


def _load_broadcast(rank: int, world_size: int, paths: list[str]) -> dict[str, Any]:
    """Only rank 0 is given the real file: the others must never open theirs."""
    mesh = init_device_mesh("cpu", (world_size,))
    expected = _file_state()
    state: dict[str, Any] = {
        "model": {
            "w": distribute_tensor(torch.zeros(9, 4), mesh, [Shard(0)], src_data_rank=None),
            "b": torch.zeros(4),  # bf16 in the file: a lossless widening
            "mask": distribute_tensor(
                torch.zeros(5, 2, dtype=torch.bool), mesh, [Shard(1)], src_data_rank=None
            ),
        },
        "step": 0,
        "name": "",
    }
    distcp.load(
        state,
        checkpoint_id=paths[rank],
        storage_reader=BroadcastingTorchSaveReader(),
        planner=DynamicMetaLoadPlanner(),
    )
    w, mask = state["model"]["w"], state["model"]["mask"]
    assert isinstance(w, DTensor) and isinstance(mask, DTensor)
    want_w = distribute_tensor(expected["model"]["w"], mesh, [Shard(0)], src_data_rank=None)
    want_mask = distribute_tensor(expected["model"]["mask"], mesh, [Shard(1)], src_data_rank=None)
    assert raw(w.to_local()) == raw(want_w.to_local())
    assert raw(mask.to_local()) == raw(want_mask.to_local())
    assert torch.equal(state["model"]["b"], expected["model"]["b"].float())
    return {"step": state["step"], "name": state["name"], "rows": w.to_local().shape[0]}


def test_broadcasting_reader_loads_dtensors_on_two_ranks(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    torch.save(_file_state(), tmp_path / "model.pt")
    paths = [str(tmp_path / "model.pt"), str(tmp_path / "absent-on-rank-1.pt")]
    results = rank_pool(2).run(_load_broadcast, paths)
    assert [r["step"] for r in results] == [42, 42]
    assert [r["name"] for r in results] == ["from-file", "from-file"]
    assert [r["rows"] for r in results] == [5, 4]


def _load_broadcast_failing(rank: int, world_size: int, path: str, case: str) -> str:
    mesh = init_device_mesh("cpu", (world_size,))
    w: Any = torch.zeros(9, 4)
    planner = DynamicMetaLoadPlanner()
    state: dict[str, Any] = {"model": {"w": w}}
    if case == "missing":
        state["model"]["nope"] = torch.zeros(2)
    elif case == "shape":
        state["model"]["w"] = distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])
    elif case == "lossy":
        state["model"]["w"] = torch.zeros(9, 4, dtype=torch.bfloat16) if rank == 1 else w
    elif case == "partial":
        state["model"]["nope"] = torch.full((2,), 7.0)
        planner = DynamicMetaLoadPlanner(allow_partial_load=True)
    try:
        distcp.load(
            state, checkpoint_id=path, storage_reader=BroadcastingTorchSaveReader(), planner=planner
        )
    except distcp.CheckpointError as error:
        causes = sorted({type(cause).__name__ for cause in error.failures.values()})
        return f"{type(error).__name__}:{','.join(causes)}:{error}"
    assert torch.equal(state["model"]["w"], _file_state()["model"]["w"])
    assert torch.equal(state["model"]["nope"], torch.full((2,), 7.0))  # skipped, untouched
    return "ok"


@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("missing", "KeyMismatchError"),
        ("shape", "ShapeMismatchError"),
        ("lossy", "DtypeMismatchError"),
    ],
)
def test_broadcasting_reader_errors_reach_every_rank(
    tmp_path: Path, rank_pool: PoolFactory, case: str, cause: str
) -> None:
    torch.save(_file_state(), tmp_path / "model.pt")
    results = rank_pool(2).run(_load_broadcast_failing, str(tmp_path / "model.pt"), case)
    for result in results:  # the same error on both ranks, naming the cause and the key
        assert result.startswith("DistributedCheckpointError:"), result
        assert cause in result and "'model." in result, result
    if case == "lossy":  # only rank 1 asked for bf16; rank 0 went on through every broadcast
        assert "rank(s) 1" in results[0]


def test_broadcasting_reader_partial_load(tmp_path: Path, rank_pool: PoolFactory) -> None:
    torch.save(_file_state(), tmp_path / "model.pt")
    results = rank_pool(2).run(_load_broadcast_failing, str(tmp_path / "model.pt"), "partial")
    assert results == ["ok", "ok"]


def test_broadcasting_reader_in_one_process(tmp_path: Path) -> None:
    expected = _file_state()
    torch.save(collections.OrderedDict(expected), tmp_path / "model.pt")
    state: dict[str, Any] = {
        "model": {"w": torch.zeros(9, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "name": None,
    }
    distcp.load(
        state,
        storage_reader=BroadcastingTorchSaveReader(tmp_path / "model.pt"),
        planner=DynamicMetaLoadPlanner(),
        no_dist=True,
    )
    assert_same(expected["model"]["w"], state["model"]["w"])
    assert_same(expected["model"]["b"], state["model"]["b"])
    assert state["name"] == "from-file"
    assert BroadcastingTorchSaveReader.validate_checkpoint_id(tmp_path / "model.pt")
    assert not BroadcastingTorchSaveReader.validate_checkpoint_id(tmp_path)


# --------------------------------------------------------------------------- torch DCP sources


def test_torch_dcp_checkpoint_converts(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict_saver import save as torch_dcp_save

    state = {
        "model": {"w": random_tensor((6, 3), torch.float32, 20), "b": torch.arange(3)},
        "layers": [random_tensor((2,), torch.bfloat16, 21), random_tensor((4,), torch.int8, 22)],
        "step": 9,
        "name": "torch-dcp",
    }
    torch_dcp_save(state, checkpoint_id=tmp_path / "torch", no_dist=True)
    convert_to_distcp(tmp_path / "torch", tmp_path / "distcp")
    assert_same(state, full_state(tmp_path / "distcp"))
    format_utils.dcp_to_torch_save(tmp_path / "torch", tmp_path / "torch.pt")
    assert_same(state, torch.load(tmp_path / "torch.pt", weights_only=True))


def test_torch_dcp_load_drives_our_reader_and_planner(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict_loader import load as torch_dcp_load

    expected = _file_state()
    torch.save(expected, tmp_path / "model.pt")
    state: dict[str, Any] = {"model": {"w": torch.zeros(9, 4)}, "step": 0}
    torch_dcp_load(
        state,
        checkpoint_id=tmp_path / "model.pt",
        storage_reader=BroadcastingTorchSaveReader(),
        planner=DynamicMetaLoadPlanner(),
        no_dist=True,
    )
    assert_same(expected["model"]["w"], state["model"]["w"])
    assert state["step"] == 42
