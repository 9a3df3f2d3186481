"""The DCP protocol in both directions: torch DCP's own storage classes and
planners (and subclasses overriding each hook) driven by ``distcp.save`` /
``distcp.load``, and distcp's storage and planners driven by torch's
``dcp.save`` / ``dcp.load``; on one process and on two gloo ranks; bit-exact.

A checkpoint's values are encoded by the save planner (torch's ``torch.save``s
them, distcp's uses its pickle-free encoding), so each case loads with a
planner that reads what its save planner wrote: distcp's load planner reads
both, torch's only its own.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem, WriteItem, WriteItemType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]

# ------------------------------------------------------------------ storage


def torch_files(path: str) -> tuple[Any, Any]:
    return torch_dcp.FileSystemWriter(path), torch_dcp.FileSystemReader(path)


def torch_fsspec(path: str) -> tuple[Any, Any]:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    url = f"memory://{uuid.uuid4().hex}/{Path(path).name}"  # in this process's memory
    return FsspecWriter(url), FsspecReader(url)


def distcp_files(path: str) -> tuple[Any, Any]:
    return distcp.FileSystemWriter(path), distcp.FileSystemReader(path)


STORAGE = {"torch-files": torch_files, "torch-fsspec": torch_fsspec, "distcp-files": distcp_files}

# ------------------------------------------------------------------ planners


class TorchDoublingSavePlanner(torch_dcp.DefaultSavePlanner):
    """Doubles every value list and every tensor through the save hooks."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO and isinstance(object, list):
            object = [x * 2 for x in object]
        return super().transform_object(write_item, object)

    def lookup_object(self, index: Any) -> Any:
        found = super().lookup_object(index)
        return found * 2 if isinstance(found, torch.Tensor) else found


class DistcpDoublingSavePlanner(distcp.DefaultSavePlanner):
    """The same hooks on distcp's planner."""

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO and isinstance(object, list):
            object = [x * 2 for x in object]
        return super().transform_object(write_item, object)

    def lookup_object(self, index: Any) -> Any:
        found = super().lookup_object(index)
        return found * 2 if isinstance(found, torch.Tensor) else found


def _add_one_on_load(base: type) -> type:
    """A load planner whose hooks add 1 to every tensor loaded: the reader
    fills a scratch tensor from ``transform_tensor``, ``commit_tensor`` adds
    1 into the ``lookup_tensor`` destination."""

    class AddOne(base):  # type: ignore[valid-type, misc]
        def transform_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> torch.Tensor:
            view = super().transform_tensor(read_item, tensor)
            self._views = getattr(self, "_views", {})
            self._views[read_item] = view
            return torch.empty_like(view)

        def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
            assert read_item.type == LoadItemType.TENSOR
            self._views.pop(read_item).copy_(tensor + 1)

        def lookup_tensor(self, index: Any) -> torch.Tensor:
            self.looked_up = getattr(self, "looked_up", 0) + 1
            found: torch.Tensor = super().lookup_tensor(index)
            return found

    return AddOne


# (name, save planner, load planner, value factor, tensor factor, added on load)
PLANNERS: dict[str, tuple[Callable[[], Any], Callable[[], Any], int, int, int]] = {
    "distcp": (distcp.DefaultSavePlanner, distcp.DefaultLoadPlanner, 1, 1, 0),
    "torch": (torch_dcp.DefaultSavePlanner, torch_dcp.DefaultLoadPlanner, 1, 1, 0),
    "torch-save-distcp-load": (torch_dcp.DefaultSavePlanner, distcp.DefaultLoadPlanner, 1, 1, 0),
    "torch-hooks": (
        TorchDoublingSavePlanner,
        _add_one_on_load(torch_dcp.DefaultLoadPlanner),
        2,
        2,
        1,
    ),
    "distcp-hooks": (
        DistcpDoublingSavePlanner,
        _add_one_on_load(distcp.DefaultLoadPlanner),
        2,
        2,
        1,
    ),
}

# ------------------------------------------------------------------ state


def local_state(fill: bool) -> dict[str, Any]:
    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if fill else torch.zeros_like(tensor)

    return {
        "model": {
            "w": pick(random_tensor((16, 8), torch.float32, 1)),
            "h": pick(random_tensor((5,), torch.bfloat16, 2)),
            "i": pick(random_tensor((3, 3), torch.int64, 3)),
        },
        "counts": [1, 2, 3] if fill else None,
    }


def sharded_state(world_size: int, fill: bool) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((8, 6), torch.float32, 4)
    source = full if fill else torch.zeros_like(full)
    return {
        "w": distribute_tensor(source, mesh, [Shard(0)], src_data_rank=None),
        "counts": [1, 2, 3] if fill else None,
    }


def expected_tensor(saved: torch.Tensor, tensor_factor: int, added: int) -> torch.Tensor:
    return saved * tensor_factor + added


def check(saved: dict[str, Any], loaded: dict[str, Any], case: tuple[Any, ...]) -> list[str]:
    """Keys whose loaded tensors or values differ from what the case expects."""
    _, _, value_factor, tensor_factor, added = case
    wrong = []
    for key in ("w", "h", "i"):
        source = saved.get("model", saved).get(key)
        target = loaded.get("model", loaded).get(key)
        if source is None:
            continue
        if isinstance(source, DTensor):
            source, target = source.to_local(), target.to_local()
        if raw(target) != raw(expected_tensor(source, tensor_factor, added)):
            wrong.append(key)
    if loaded["counts"] != [x * value_factor for x in saved["counts"]]:
        wrong.append(f"counts={loaded['counts']}")
    return wrong


def run_case(
    driver: str, storage: str, planners: str, path: str, make_state: Callable[[bool], Any]
) -> list[str]:
    """Save and load once; ``driver`` is the library whose save/load runs."""
    case = PLANNERS[planners]
    library: Any = distcp if driver == "distcp" else torch_dcp
    writer, reader = STORAGE[storage](path)
    saved, fresh = make_state(True), make_state(False)
    in_place = dict(_tensors_of(fresh))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        library.save(saved, storage_writer=writer, planner=case[0]())
        library.load(fresh, storage_reader=reader, planner=case[1]())
    moved = [key for key, tensor in _tensors_of(fresh) if tensor is not in_place[key]]
    return check(saved, fresh, case) + [f"{key} not in place" for key in moved]


def _tensors_of(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    inner = state.get("model", state)
    return [(key, value) for key, value in inner.items() if isinstance(value, torch.Tensor)]


# Which (driver, storage) pairs make sense: torch drives distcp's storage (and its
# own, as the reference); distcp drives every storage.
PAIRS = [
    ("distcp", "torch-files"),
    ("distcp", "torch-fsspec"),
    ("distcp", "distcp-files"),
    ("torch", "distcp-files"),
]


def _cases() -> list[Any]:
    cases = []
    for driver, storage in PAIRS:
        for planners in PLANNERS:
            if driver == "torch" and planners == "distcp-hooks":
                continue  # covered by distcp-driven runs; keeps the matrix small
            cases.append(
                pytest.param(driver, storage, planners, id=f"{driver}-{storage}-{planners}")
            )
    return cases


@pytest.mark.parametrize(("driver", "storage", "planners"), _cases())
def test_one_process(tmp_path: Path, driver: str, storage: str, planners: str) -> None:
    assert run_case(driver, storage, planners, str(tmp_path / "ckpt"), local_state) == []


def on_two_ranks(rank: int, world_size: int, path: str) -> list[str]:
    wrong = []
    for driver, storage in PAIRS:
        if storage == "torch-fsspec":
            continue  # memory:// is per process: the ranks would not share it
        for planners in ("distcp", "torch", "torch-hooks", "distcp-hooks"):
            where = f"{path}/{driver}-{storage}-{planners}"
            problems = run_case(
                driver, storage, planners, where, lambda fill: sharded_state(world_size, fill)
            )
            wrong.extend(f"{driver}/{storage}/{planners}: {p}" for p in problems)
    return wrong


def test_two_ranks_every_direction(tmp_path: Path, rank_pool: PoolFactory) -> None:
    assert rank_pool(2).run(on_two_ranks, str(tmp_path)) == [[], []]


# ------------------------------------------------------------------ Hugging Face


def test_torch_hugging_face_storage_through_distcp(tmp_path: Path) -> None:
    """torch's safetensors storage classes, driven by distcp, round-trip
    tensors, and the files are real safetensors files."""
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

    saved = {"model.w": random_tensor((6, 4), torch.float32, 5),
             "model.b": random_tensor((4,), torch.bfloat16, 6)}  # fmt: skip
    distcp.save(
        saved,
        storage_writer=HuggingFaceStorageWriter(str(tmp_path)),
        planner=torch_dcp.DefaultSavePlanner(),
        no_dist=True,
    )
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files, "no .safetensors file written"
    on_disk = {key: value for file in files for key, value in load_file(file).items()}
    assert {key: raw(value) for key, value in on_disk.items()} == {
        key: raw(value) for key, value in saved.items()
    }
    fresh = {key: torch.zeros_like(value) for key, value in saved.items()}
    distcp.load(fresh, storage_reader=HuggingFaceStorageReader(str(tmp_path)), no_dist=True)
    assert [raw(fresh[key]) == raw(saved[key]) for key in saved] == [True, True]


# ------------------------------------------------------------------ API shape


def test_old_positional_storage_argument_works_with_a_warning(tmp_path: Path) -> None:
    saved = local_state(True)
    with pytest.warns(FutureWarning, match="old argument order"):
        distcp.save(saved, distcp.FileSystemWriter(tmp_path), no_dist=True)
    fresh = local_state(False)
    with pytest.warns(FutureWarning, match="old argument order"):
        distcp.load(fresh, distcp.FileSystemReader(tmp_path), no_dist=True)
    assert check(saved, fresh, PLANNERS["distcp"]) == []


def test_unknown_keyword_arguments_raise() -> None:
    with pytest.raises(TypeError):
        distcp.save({}, checkpoint_id="x", no_dist=True, sync_file=False)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        distcp.load({}, checkpoint_id="x", no_dist=True, verify_checksum=False)  # type: ignore[call-arg]


def test_a_url_never_becomes_a_local_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL goes to its fsspec store (here memory://), never to a local
    directory named after it; an unknown protocol is a clear error."""
    monkeypatch.chdir(tmp_path)
    distcp.save({"x": torch.arange(4)}, checkpoint_id="memory://matrix/ckpt", no_dist=True)
    fresh = {"x": torch.zeros(4, dtype=torch.int64)}
    distcp.load(fresh, checkpoint_id="memory://matrix/ckpt", no_dist=True)
    assert fresh["x"].tolist() == [0, 1, 2, 3]
    with pytest.raises(distcp.UnsupportedStorageError, match="nosuch"):
        distcp.save({"x": torch.ones(1)}, checkpoint_id="nosuch://bucket/ckpt", no_dist=True)
    with pytest.raises(distcp.UnsupportedStorageError, match="nosuch"):
        distcp.load({"x": torch.ones(1)}, checkpoint_id="nosuch://bucket/ckpt", no_dist=True)
    assert list(tmp_path.iterdir()) == []


def test_a_file_url_is_its_path(tmp_path: Path) -> None:
    distcp.save({"x": torch.arange(3)}, checkpoint_id=f"file://{tmp_path}/c", no_dist=True)
    fresh = {"x": torch.zeros(3, dtype=torch.int64)}
    distcp.load(fresh, checkpoint_id=tmp_path / "c", no_dist=True)
    assert fresh["x"].tolist() == [0, 1, 2]


def test_a_global_plan_needs_no_set_up(tmp_path: Path) -> None:
    """DCP's tests call create_global_plan on a fresh planner."""
    planner = distcp.DefaultSavePlanner()
    planner.set_up_planner({"x": torch.ones(2)}, is_coordinator=True)
    local = planner.create_local_plan()
    plans, metadata = distcp.DefaultSavePlanner().create_global_plan([local])
    assert list(metadata.state_dict_metadata) == ["x"] and len(plans) == 1


def test_plan_cache_hit_records_this_saves_checkpoint_id(tmp_path: Path) -> None:
    state = {"x": torch.ones(4)}
    planner = distcp.DefaultSavePlanner(enable_plan_caching=True)
    first = distcp.save(state, checkpoint_id=tmp_path / "step-1", planner=planner, no_dist=True)
    second = distcp.save(state, checkpoint_id=tmp_path / "step-2", planner=planner, no_dist=True)
    assert first.storage_meta is not None and second.storage_meta is not None
    assert str(first.storage_meta.checkpoint_id).endswith("step-1")
    assert str(second.storage_meta.checkpoint_id).endswith("step-2")


class Recorder:
    """A Stateful that records the order its hooks run in."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def state_dict(self) -> dict[str, Any]:
        self.log.append(f"state_dict {self.name}")
        return {"v": torch.ones(1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.append(f"load {self.name}")


def test_stateful_hooks_run_in_sorted_key_order_on_load(tmp_path: Path) -> None:
    """Ranks whose dicts are ordered differently must still run collective
    hooks in the same order: load sorts the keys, as torch DCP does."""
    log: list[str] = []
    distcp.save(
        {"b": Recorder("b", log), "a": Recorder("a", log)}, checkpoint_id=tmp_path, no_dist=True
    )
    log.clear()
    distcp.load(
        {"b": Recorder("b", log), "a": Recorder("a", log)}, checkpoint_id=tmp_path, no_dist=True
    )
    assert log == ["state_dict a", "state_dict b", "load a", "load b"]


def failing_on_rank_one(rank: int, world_size: int, path: str) -> tuple[list[int], str, bool]:
    class Failing(distcp.DefaultSavePlanner):
        def create_local_plan(self) -> Any:
            if rank == 1:
                raise OSError("disk on fire")
            return super().create_local_plan()

    try:
        distcp.save({"x": torch.ones(2)}, checkpoint_id=path, planner=Failing())
    except distcp.CheckpointException as error:
        exc, stack = error.failures[1]
        return sorted(error.failures), type(exc).__name__, hasattr(stack, "format")
    return [], "", False


def test_failures_map_rank_to_exception_and_stack(tmp_path: Path, rank_pool: PoolFactory) -> None:
    results = rank_pool(2).run(failing_on_rank_one, str(tmp_path))
    assert results == [([1], "OSError", True)] * 2


class NotAllowed:
    """A class torch.load(weights_only=True) refuses to build."""


def test_a_torch_save_value_loads_safely(tmp_path: Path) -> None:
    """A value torch's planner wrote (torch.save bytes) loads through distcp's
    planner with weights_only=True; one holding an arbitrary object is refused."""
    torch_dcp.save({"ok": ("a", 1)}, checkpoint_id=tmp_path / "ok", no_dist=True)
    fresh: dict[str, Any] = {"ok": None}
    distcp.load(fresh, storage_reader=torch_dcp.FileSystemReader(tmp_path / "ok"), no_dist=True)
    assert fresh == {"ok": ("a", 1)}
    torch_dcp.save({"bad": NotAllowed()}, checkpoint_id=tmp_path / "bad", no_dist=True)
    with pytest.raises(distcp.CheckpointError, match=r"'bad'.*weights_only"):
        distcp.load(
            {"bad": None},
            storage_reader=torch_dcp.FileSystemReader(tmp_path / "bad"),
            no_dist=True,
        )
