"""Failures during a save: a rank that raises while planning, writing or
committing, a rank that dies, and a full disk. Each ends with every rank raising
the same error and the previous checkpoint at the path intact, bit for bit."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distcp
from distcp.filesystem import layout
from distcp.testing import RankPool
from snapshots import checkpoint_bytes as snapshot

PoolFactory = Callable[[int], RankPool]
METADATA = ".metadata.distcp"


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def full_state(version: int) -> dict[str, Any]:
    """The global content of save number ``version``."""
    generator = torch.Generator().manual_seed(version)
    return {
        "w": torch.randn(6, 4, generator=generator),
        "b": torch.randint(-100, 100, (3,), generator=generator, dtype=torch.int64),
        "step": version,
    }


def rank_state(world_size: int, version: int) -> dict[str, Any]:
    """``full_state`` as the ranks hold it: ``w`` sharded by rows, ``b`` replicated."""
    state = full_state(version)
    if dist.is_initialized():
        mesh = init_device_mesh("cpu", (world_size,))
        state["w"] = distribute_tensor(state["w"], mesh, [Shard(0)], src_data_rank=None)
    return state


def assert_previous_checkpoint_intact(path: Path, before: dict[str, bytes], version: int) -> None:
    """Every file of the committed checkpoint is unchanged (the metadata above
    all); new files are only data files of the failed save; and it loads."""
    after = snapshot(path)
    assert after[METADATA] == before[METADATA]
    assert {name: after.get(name) for name in before} == before
    assert all(layout.is_data_file_name(name) for name in after.keys() - before.keys())
    target: dict[str, Any] = {"w": torch.zeros(6, 4), "b": torch.zeros(3, dtype=torch.int64)}
    target["step"] = -1
    distcp.load(target, checkpoint_id=path, no_dist=True)
    expected = full_state(version)
    assert raw(target["w"]) == raw(expected["w"]) and raw(target["b"]) == raw(expected["b"])
    assert target["step"] == version


class FaultyWriter(distcp.FileSystemWriter):
    """Raises in ``write_data`` (after writing its files) or ``finish`` on one rank."""

    def __init__(self, path: str, where: str, fail_rank: int) -> None:
        super().__init__(path)
        self.where, self.fail_rank = where, fail_rank

    def _fail(self, where: str) -> None:
        if where == self.where and dist.get_rank() == self.fail_rank:
            raise RuntimeError(f"injected {where} failure")

    def write_data(self, plan: distcp.SavePlan, planner: distcp.SavePlanner) -> Any:
        written = super().write_data(plan, planner)
        self._fail("write")
        return written

    def finish(self, metadata: distcp.Metadata, results: list[list[distcp.WriteResult]]) -> None:
        self._fail("commit")
        super().finish(metadata, results)


class FaultyPlanner(distcp.DefaultSavePlanner):
    def __init__(self, fail_rank: int) -> None:
        super().__init__()
        self.fail_rank = fail_rank

    def create_local_plan(self) -> distcp.SavePlan:
        if dist.get_rank() == self.fail_rank:
            raise RuntimeError("injected plan failure")
        return super().create_local_plan()


def save_version(rank: int, world_size: int, path: str, version: int) -> None:
    distcp.save(rank_state(world_size, version), checkpoint_id=path)


def failing_save(rank: int, world_size: int, path: str, where: str) -> tuple[str, list[int], str]:
    state = rank_state(world_size, version=2)
    writer = FaultyWriter(path, where, fail_rank=0 if where in ("commit", "rename") else 1)
    planner = FaultyPlanner(fail_rank=1) if where == "plan" else None
    renaming: Any = contextlib.nullcontext()
    if where == "rename" and rank == 0:  # the commit's last step fails on the coordinator
        no_space = OSError(errno.ENOSPC, "No space left on device")
        renaming = mock.patch.object(layout.os, "replace", side_effect=no_space)
    with renaming, pytest.raises(distcp.DistributedCheckpointError) as caught:
        distcp.save(state, storage_writer=writer, planner=planner)
    error = caught.value
    return str(error), sorted(error.failures), str(error.causes[min(error.causes)])


@pytest.mark.parametrize(
    ("where", "failing_rank", "step", "cause"),
    [
        ("plan", 1, "planning the save", "injected plan failure"),
        ("write", 1, "writing the checkpoint", "injected write failure"),
        ("commit", 0, "writing the checkpoint", "injected commit failure"),
        ("rename", 0, "writing the checkpoint", "No space left on device"),
    ],
)
def test_a_rank_that_raises_fails_the_save_everywhere_and_commits_nothing(
    rank_pool: PoolFactory, tmp_path: Path, where: str, failing_rank: int, step: str, cause: str
) -> None:
    pool = rank_pool(2)
    pool.run(save_version, str(tmp_path), 1)
    before = snapshot(tmp_path)

    results = pool.run(failing_save, str(tmp_path), where)

    assert results[0] == results[1], "every rank raises the same error"
    message, failing_ranks, rank_cause = results[0]
    assert failing_ranks == [failing_rank]
    assert f"{step} failed on rank(s) {failing_rank}" in message
    assert cause in message and cause in rank_cause
    assert_previous_checkpoint_intact(tmp_path, before, version=1)
    assert not any(layout.is_temporary_metadata_name(p.name) for p in tmp_path.iterdir())
    # The ranks carry on: the next save commits, and removes the failed save's files.
    pool.run(save_version, str(tmp_path), 3)
    before = snapshot(tmp_path)
    assert_previous_checkpoint_intact(tmp_path, before, version=3)
    save_ids = {name.split("-")[1] for name in before if layout.is_data_file_name(name)}
    assert len(save_ids) == 1, sorted(before)


def save_sharded(rank: int, world_size: int, path: str) -> None:
    distcp.save({"w": rank_state(world_size, version=1)["w"]}, checkpoint_id=path)


def load_sharded(rank: int, world_size: int, path: str) -> tuple[str, list[int]]:
    target = {"w": rank_state(world_size, version=0)["w"]}
    with pytest.raises(distcp.DistributedCheckpointError) as caught:
        distcp.load(target, checkpoint_id=path)
    return str(caught.value), sorted(caught.value.failures)


def test_a_rank_whose_read_fails_fails_the_load_everywhere(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = rank_pool(2)
    pool.run(save_sharded, str(tmp_path))
    (rank1_file,) = tmp_path.glob("data-*-00001-*.distcp")  # only rank 1 reads it
    data = bytearray(rank1_file.read_bytes())
    data[5] ^= 0x10
    rank1_file.write_bytes(bytes(data))

    results = pool.run(load_sharded, str(tmp_path))

    assert results[0] == results[1]
    message, failing_ranks = results[0]
    assert failing_ranks == [1]
    assert "reading the checkpoint failed on rank(s) 1" in message
    assert "CorruptCheckpointError" in message and rank1_file.name in message


class DyingWriter(distcp.FileSystemWriter):
    """Rank 1 exits mid-save, after writing its data files, as a crash would."""

    def write_data(self, plan: distcp.SavePlan, planner: distcp.SavePlanner) -> Any:
        written = super().write_data(plan, planner)
        if dist.get_rank() == 1:
            os._exit(3)
        return written


def save_and_die(rank: int, world_size: int, path: str) -> str:
    try:
        distcp.save(rank_state(world_size, version=2), storage_writer=DyingWriter(path))
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "committed"


def test_a_rank_that_dies_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    pool = RankPool(2, collective_timeout_s=5)
    try:
        pool.run(save_version, str(tmp_path), 1)
        before = snapshot(tmp_path)
        for tasks in pool.tasks:
            tasks.put((save_and_die, (str(tmp_path),)))
        try:
            rank, ok, survivor = pool.results.get(timeout=60)
        except queue.Empty:
            pytest.fail("rank 0 hung after rank 1 died")
        pool.processes[1].join(timeout=10)
        assert pool.processes[1].exitcode == 3
        assert (rank, ok) == (0, True)
        assert survivor != "committed"
        # Caught at the monitored barrier before the exchange: it names the dead rank.
        assert survivor.startswith("CollectiveTimeoutError: writing the checkpoint"), survivor
        assert "rank(s) 1 did not arrive" in survivor and "died" in survivor, survivor
        assert_previous_checkpoint_intact(tmp_path, before, version=1)
    finally:
        pool.broken = True
        pool.close()


@pytest.mark.parametrize("where", ["data", "metadata"])
def test_a_full_disk_in_one_process_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    distcp.save(full_state(1), checkpoint_id=tmp_path, no_dist=True)
    before = snapshot(tmp_path)

    def no_space(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "data":  # the data files' fsync reports the full disk
        monkeypatch.setattr("distcp.filesystem.writer.os.fsync", no_space)
    else:  # the metadata cannot be renamed into place
        monkeypatch.setattr("distcp.filesystem.layout.os.replace", no_space)
    with pytest.raises(distcp.CheckpointError, match="No space left on device") as caught:
        distcp.save(full_state(2), checkpoint_id=tmp_path, no_dist=True)
    assert isinstance(caught.value.causes.get(0), OSError)
    monkeypatch.undo()
    assert_previous_checkpoint_intact(tmp_path, before, version=1)
    assert not any(layout.is_temporary_metadata_name(p.name) for p in tmp_path.iterdir())
