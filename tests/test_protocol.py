"""The planner and storage protocol is DCP's: custom planners and storage see
DCP's call order on every rank, DCP's documented planner examples port by
changing the import, and storage written from scratch against the abstract
interfaces works."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch

import distcp
from distcp import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    Metadata,
    MetadataIndex,
    ReadItem,
    SavePlan,
    SavePlanner,
    StorageMeta,
    StorageReader,
    StorageWriter,
    WriteItem,
    WriteItemType,
    WriteResult,
)
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
STATE_DICT_TYPE = dict[str, Any]


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# --- call order -------------------------------------------------------------------------------


class RecordingSavePlanner(DefaultSavePlanner):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.resolved: list[MetadataIndex] = []
        self.final_items: list[MetadataIndex] = []

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.log.append(f"set_up_planner({is_coordinator})")
        super().set_up_planner(state_dict, storage_meta, is_coordinator)

    def create_local_plan(self) -> SavePlan:
        self.log.append("create_local_plan")
        return super().create_local_plan()

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        self.log.append(f"create_global_plan({len(all_plans)})")
        return super().create_global_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.log.append("finish_plan")
        self.final_items = [item.index for item in new_plan.items]
        return super().finish_plan(new_plan)

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        self.log.append("resolve_data")
        self.resolved.append(write_item.index)
        return super().resolve_data(write_item)


class RecordingWriter(FileSystemWriter):
    def __init__(self, path: str, log: list[str]) -> None:
        super().__init__(path)
        self.log = log

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.log.append(f"set_up_storage_writer({is_coordinator})")
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.log.append("prepare_local_plan")
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.log.append(f"prepare_global_plan({len(plans)})")
        return super().prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self.log.append("write_data")
        future = super().write_data(plan, planner)
        self.log.append("write_data returned")
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.log.append(f"finish({len(results)})")
        super().finish(metadata, results)


class RecordingLoadPlanner(DefaultLoadPlanner):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.open: set[ReadItem] = set()

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.log.append(f"set_up_planner({is_coordinator})")
        super().set_up_planner(state_dict, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        self.log.append("create_local_plan")
        return super().create_local_plan()

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        self.log.append(f"create_global_plan({len(global_plan)})")
        return super().create_global_plan(global_plan)

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        self.log.append("finish_plan")
        return super().finish_plan(central_plan)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.log.append("load_bytes")
        super().load_bytes(read_item, value)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        self.log.append("resolve_tensor")
        self.open.add(read_item)
        return super().resolve_tensor(read_item)

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        self.log.append("commit_tensor")
        self.open.remove(read_item)  # each resolved tensor is committed once
        super().commit_tensor(read_item, tensor)


class RecordingReader(FileSystemReader):
    def __init__(self, path: str, log: list[str]) -> None:
        super().__init__(path)
        self.log = log

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self.log.append("read_metadata")
        return super().read_metadata(*args, **kwargs)

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.log.append(f"set_up_storage_reader({is_coordinator})")
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        self.log.append("prepare_local_plan")
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        self.log.append(f"prepare_global_plan({len(plans)})")
        return super().prepare_global_plan(plans)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        self.log.append("read_data")
        future = super().read_data(plan, planner)
        self.log.append("read_data returned")
        return future


def outline(log: list[str], inner: set[str]) -> list[str]:
    """The log with each run of calls from ``inner`` shown once, as the set of them."""
    result: list[str] = []
    run: set[str] = set()
    for call in [*log, ""]:
        if call in inner:
            run.add(call)
            continue
        if run:
            result.append("{" + ", ".join(sorted(run)) + "}")
            run = set()
        if call:
            result.append(call)
    return result


def expected_save(coordinator: bool, world_size: int) -> list[str]:
    return [
        f"set_up_planner({coordinator})",
        f"set_up_storage_writer({coordinator})",
        "create_local_plan",
        "prepare_local_plan",
        *([f"create_global_plan({world_size})", f"prepare_global_plan({world_size})"]
          if coordinator else []),
        "finish_plan",
        "write_data",
        "{resolve_data}",
        "write_data returned",
        *([f"finish({world_size})"] if coordinator else []),
    ]  # fmt: skip


def expected_load(coordinator: bool, world_size: int) -> list[str]:
    return [
        "read_metadata",
        f"set_up_planner({coordinator})",
        f"set_up_storage_reader({coordinator})",
        "create_local_plan",
        "prepare_local_plan",
        *([f"create_global_plan({world_size})", f"prepare_global_plan({world_size})"]
          if coordinator else []),
        "finish_plan",
        "read_data",
        "{commit_tensor, load_bytes, resolve_tensor}",
        "read_data returned",
    ]  # fmt: skip


def recorded_save_and_load(
    rank: int, world_size: int, path: str, no_dist: bool = False, coordinator_rank: int = 0
) -> tuple[list[str], list[str], bool]:
    """Save and load with recording planners and storage; return both logs,
    outlined, and whether every planned item was resolved exactly once. A
    coordinator other than rank 0 goes through the older entry points."""
    state = {"w": torch.arange(6.0), "nested": {"b": torch.ones(2, 2)}, "step": 5}
    save_log: list[str] = []
    planner = RecordingSavePlanner(save_log)
    writer = RecordingWriter(path, save_log)
    if coordinator_rank:
        distcp.save_state_dict(
            state, writer, coordinator_rank=coordinator_rank, planner=planner, no_dist=no_dist
        )
    else:
        distcp.save(state, storage_writer=writer, planner=planner, no_dist=no_dist)
    resolved_once = sorted(map(repr, planner.resolved)) == sorted(map(repr, planner.final_items))

    load_log: list[str] = []
    target = {"w": torch.zeros(6), "nested": {"b": torch.zeros(2, 2)}, "step": 0}
    load_planner = RecordingLoadPlanner(load_log)
    reader = RecordingReader(path, load_log)
    if coordinator_rank:
        distcp.load_state_dict(
            target, reader, coordinator_rank=coordinator_rank, planner=load_planner, no_dist=no_dist
        )
    else:
        distcp.load(target, storage_reader=reader, planner=load_planner, no_dist=no_dist)
    assert not load_planner.open, "resolved tensors that were never committed"
    assert torch.equal(target["w"], state["w"]) and target["step"] == 5
    return (
        outline(save_log, {"resolve_data"}),
        outline(load_log, {"load_bytes", "resolve_tensor", "commit_tensor"}),
        resolved_once,
    )


@pytest.mark.parametrize("coordinator_rank", [0, 1])
def test_call_order_on_coordinator_and_other_ranks(
    rank_pool: PoolFactory, tmp_path: Path, coordinator_rank: int
) -> None:
    results = rank_pool(2).run(recorded_save_and_load, str(tmp_path), False, coordinator_rank)
    for rank, (save_log, load_log, resolved_once) in enumerate(results):
        coordinator = rank == coordinator_rank
        assert save_log == expected_save(coordinator, 2), f"rank {rank}"
        assert load_log == expected_load(coordinator, 2), f"rank {rank}"
        assert resolved_once, f"rank {rank}"


def test_call_order_without_a_process_group(tmp_path: Path) -> None:
    save_log, load_log, resolved_once = recorded_save_and_load(0, 1, str(tmp_path), no_dist=True)
    assert save_log == expected_save(True, 1)
    assert load_log == expected_load(True, 1)
    assert resolved_once


# --- DCP's documented planner examples, with only the import changed --------------------------


class RenamePlanner(DefaultSavePlanner):
    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        # prefix all keys with `foo_``
        super().set_up_planner(
            {"foo_" + k: v for k, v in state_dict.items()}, storage_meta, is_coordinator
        )


class RenameLoadPlanner(DefaultLoadPlanner):
    """Loads what ``RenamePlanner`` saved back under the original keys."""

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        self.unprefixed_state_dict = state_dict
        super().set_up_planner(
            {"foo_" + k: v for k, v in state_dict.items()}, metadata, is_coordinator
        )

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        super().load_bytes(read_item, value)
        # Remove the "foo_" prefix
        fqn = read_item.dest_index.fqn
        self.unprefixed_state_dict[fqn[4:]] = self.state_dict[fqn]


class FP16Planner(DefaultSavePlanner):
    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        for p in plan.items:
            if p.tensor_data is not None:
                p.tensor_data.properties.dtype = torch.float16
        return plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        item = super().resolve_data(write_item)
        assert isinstance(item, (torch.Tensor, io.BytesIO))
        return item if write_item.type == WriteItemType.BYTE_IO else item.to(torch.float16)


class SaveExtraDataPlanner(DefaultSavePlanner):
    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        return dataclasses.replace(plan, planner_data="per-rank-data")

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        global_plan, metadata = super().create_global_plan(all_plans)
        merged_data = [p.planner_data for p in global_plan]
        metadata = dataclasses.replace(metadata, planner_data=merged_data)
        return global_plan, metadata


def test_rename_planners(tmp_path: Path) -> None:
    state = {"layer": torch.arange(4.0), "step": 9}
    metadata = distcp.save(state, checkpoint_id=tmp_path, planner=RenamePlanner(), no_dist=True)
    assert sorted(metadata.state_dict_metadata) == ["foo_layer", "foo_step"]
    target = {"layer": torch.zeros(4), "step": 0}
    with pytest.raises(distcp.KeyMismatchError, match="'layer'"):
        distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    distcp.load(target, checkpoint_id=tmp_path, planner=RenameLoadPlanner(), no_dist=True)
    assert torch.equal(target["layer"], state["layer"]) and target["step"] == 9


def test_fp16_planner_saves_half_precision(tmp_path: Path) -> None:
    weight = torch.randn(3, 5)
    metadata = distcp.save(
        {"w": weight, "tag": "x"}, checkpoint_id=tmp_path, planner=FP16Planner(), no_dist=True
    )
    entry = metadata.state_dict_metadata["w"]
    assert isinstance(entry, distcp.TensorStorageMetadata)
    assert entry.properties.dtype == torch.float16
    half = {"w": torch.zeros(3, 5, dtype=torch.float16), "tag": ""}
    distcp.load(half, checkpoint_id=tmp_path, no_dist=True)
    assert raw(half["w"]) == raw(weight.half()) and half["tag"] == "x"
    widened = {"w": torch.zeros(3, 5)}  # fp16 -> fp32 is lossless, so it is cast on load
    distcp.load(widened, checkpoint_id=tmp_path, no_dist=True)
    assert raw(widened["w"]) == raw(weight.half().float())


def test_planner_data_of_a_custom_planner_is_kept(tmp_path: Path) -> None:
    planner = SaveExtraDataPlanner(flatten_state_dict=False)
    state = {"w": torch.ones(2), "step": 1}
    metadata = distcp.save(state, checkpoint_id=tmp_path, planner=planner, no_dist=True)
    assert metadata.planner_data == ["per-rank-data"]
    reader = FileSystemReader(tmp_path)
    assert reader.read_metadata().planner_data == ["per-rank-data"]
    target = {"w": torch.zeros(2), "step": 0}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["w"], state["w"]) and target["step"] == 1


def test_legacy_entry_points(tmp_path: Path) -> None:
    state = {"model": {"w": torch.randn(4, 2)}, "epoch": 2}
    distcp.save_state_dict(state, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    target = {"model": {"w": torch.zeros(4, 2)}, "epoch": 0}
    distcp.load_state_dict(target, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    assert raw(target["model"]["w"]) == raw(state["model"]["w"]) and target["epoch"] == 2


# --- storage written from scratch against the abstract interfaces ------------------------------


class MemoryWriter(StorageWriter):
    """Keeps each item in ``store``; commits the metadata last, as a real backend would."""

    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def reset(self, checkpoint_id: Any = None) -> None:
        self.items: dict[MetadataIndex, Any] = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.items = {}

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=f"rank{i}") for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = []
        for item in plan.items:
            data = planner.resolve_data(item)
            if isinstance(data, io.BytesIO):
                stored: Any = data.getvalue()
                size = len(stored)
            else:
                stored = data.detach().clone()
                size = stored.numel() * stored.element_size()
            name = f"{plan.storage_data}/{item.index.fqn}/{item.index.offset}"
            self.store.setdefault("blobs", {})[name] = stored
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data=name))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for part in results for r in part}
        self.store["metadata"] = metadata

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class MemoryReader(StorageReader):
    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata: Metadata = self.store["metadata"]
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            stored = self.store["blobs"][self.metadata.storage_data[item.storage_index]]
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(stored))
                continue
            source = stored
            for dim, (offset, length) in enumerate(
                zip(item.storage_offsets, item.lengths, strict=True)
            ):
                source = source.narrow(dim, offset, length)
            destination = planner.resolve_tensor(item)
            destination.copy_(source)
            planner.commit_tensor(item, destination)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def test_storage_written_from_scratch() -> None:
    store: dict[str, Any] = {}
    state = {
        "model": {"w": torch.randn(3, 4), "b": torch.arange(3, dtype=torch.int32)},
        "optim": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.01},
        "names": ["a", "b"],
    }
    distcp.save(state, storage_writer=MemoryWriter(store), no_dist=True)
    assert set(store) == {"blobs", "metadata"}
    target = {
        "model": {"w": torch.zeros(3, 4), "b": torch.zeros(3, dtype=torch.int32)},
        "optim": {"state": {0: {"step": torch.tensor(0.0)}}, "lr": 0.0},
        "names": [],
    }
    w = target["model"]["w"]
    distcp.load(target, storage_reader=MemoryReader(store), no_dist=True)
    assert target["model"]["w"] is w and raw(w) == raw(state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert target["optim"]["state"][0]["step"].item() == 3.0
    assert target["optim"]["lr"] == 0.01 and target["names"] == ["a", "b"]
