"""The ``<dir>/.metadata`` probe: checkpoint managers written for torch DCP
(torchtitan's among them) find a complete distcp checkpoint by that file's
existence, never an incomplete one, and torch DCP pointed at a distcp
checkpoint fails without unpickling anything."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp

import distcp
from distcp.filesystem.layout import (
    METADATA_FILE_NAME,
    PROBE_FILE_NAME,
    is_temporary_metadata_name,
    probe_file_name,
)
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]


class FailingPlanner(distcp.DefaultSavePlanner):
    """A save that fails on its rank after planning, before anything commits."""

    def resolve_data(self, write_item: Any) -> Any:
        raise OSError("disk gone")


def test_a_complete_checkpoint_answers_the_metadata_probe(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path, no_dist=True)
    assert (tmp_path / PROBE_FILE_NAME).is_file()
    distcp.save({"x": torch.zeros(3)}, checkpoint_id=tmp_path, no_dist=True)  # overwritten
    assert (tmp_path / PROBE_FILE_NAME).is_file() and (tmp_path / METADATA_FILE_NAME).is_file()
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_a_failed_first_save_leaves_no_probe(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointError):
        distcp.save(
            {"x": torch.ones(3)}, checkpoint_id=tmp_path, planner=FailingPlanner(), no_dist=True
        )
    assert not (tmp_path / PROBE_FILE_NAME).exists()
    assert not (tmp_path / METADATA_FILE_NAME).exists()


def test_a_failed_save_over_a_checkpoint_leaves_its_probe_and_metadata(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path, no_dist=True)
    names = (PROBE_FILE_NAME, METADATA_FILE_NAME)
    before = {name: (tmp_path / name).read_bytes() for name in names}
    with pytest.raises(distcp.CheckpointError):
        distcp.save(
            {"x": torch.zeros(3)}, checkpoint_id=tmp_path, planner=FailingPlanner(), no_dist=True
        )
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    fresh = {"x": torch.zeros(3)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert fresh["x"].tolist() == [1.0, 1.0, 1.0]


class Payload:
    """Unpickling this would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_torch_dcp_pointed_at_a_distcp_checkpoint_fails_unpickling_nothing(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    probe = (tmp_path / "ckpt" / PROBE_FILE_NAME).read_bytes()
    assert probe.startswith(b"#")
    with pytest.raises(pickle.UnpicklingError, match="invalid load key"):
        pickle.loads(probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BaseException, match="invalid load key"):
            torch_dcp.load({"x": torch.zeros(3)}, checkpoint_id=tmp_path / "ckpt")
    # The check above is meaningful: a real pickle there would have run.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def rank_local_save(rank: int, world_size: int, path: str, fail_rank: int) -> str:
    planner = FailingPlanner() if rank == fail_rank else None
    try:
        distcp.save(
            {"w": torch.full((2,), float(rank))},
            checkpoint_id=path,
            planner=planner,
            use_collectives=False,
        )
    except distcp.CheckpointError as error:
        return type(error).__name__
    return "saved"


def test_a_rank_local_save_writes_each_ranks_probe_and_no_global_one(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    assert rank_pool(2).run(rank_local_save, str(tmp_path), -1) == ["saved", "saved"]
    names = set(os.listdir(tmp_path))
    for rank in (0, 1):
        assert {f"__{rank}{METADATA_FILE_NAME}", probe_file_name(rank)} <= names
        assert (tmp_path / probe_file_name(rank)).read_bytes().startswith(b"#")
    assert METADATA_FILE_NAME not in names and PROBE_FILE_NAME not in names


def test_a_rank_local_save_that_fails_on_one_rank_fails_on_both(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    errors = rank_pool(2).run(rank_local_save, str(tmp_path), 1)
    assert errors == ["DistributedCheckpointError", "DistributedCheckpointError"]
    assert probe_file_name(1) not in os.listdir(tmp_path)


def test_a_rank_local_cleanup_removes_only_its_own_temporaries() -> None:
    save_id = "0123456789abcdef"
    for name in (f".metadata.distcp.tmp-{save_id}", f".metadata.tmp-{save_id}"):
        assert is_temporary_metadata_name(name) and not is_temporary_metadata_name(name, 0)
    for rank in (0, 3):
        for final in (f"__{rank}.metadata.distcp", f"__{rank}.metadata"):
            name = f"{final}.tmp-{save_id}"
            assert is_temporary_metadata_name(name) and is_temporary_metadata_name(name, rank)
            assert not is_temporary_metadata_name(name, rank + 1)
    for other in (".metadata", ".metadata.distcp", "__0.metadata", f".metadata.tmp-{save_id}x"):
        assert not is_temporary_metadata_name(other)
