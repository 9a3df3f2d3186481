"""distcp.save and distcp.load ask storages for their extra roles by
protocol (``distcp.storage_roles``), not by class: a storage that is not
distcp's FileSystemReader/Writer but does the job takes part."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import distcp
from distcp.storage_roles import JointlyVerifyingReader, ReleasingWriter


class Delegating(distcp.StorageReader):
    """Someone's own reader around distcp's: not a FileSystemReader."""

    def __init__(self, path: Path) -> None:
        self.inner = distcp.FileSystemReader(path)
        self.calls: list[str] = []

    def reset(self, checkpoint_id: Any = None) -> None:
        self.inner.reset(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.read_metadata(*args, **kwargs)

    def set_up_storage_reader(self, metadata: Any, is_coordinator: bool, *a: Any, **k: Any) -> None:
        self.calls.append(f"set_up joint={k.get('joint_verification')}")
        self.inner.set_up_storage_reader(metadata, is_coordinator, *a, **k)

    def prepare_local_plan(self, plan: Any) -> Any:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: Any) -> Any:
        return self.inner.prepare_global_plan(plans)

    def read_data(self, plan: Any, planner: Any) -> Any:
        return self.inner.read_data(plan, planner)

    def masked_checksums(self) -> Any:
        self.calls.append("masked_checksums")
        return self.inner.masked_checksums()

    def verify_split_blocks(self, contributions: list[dict[Any, int]]) -> None:
        self.calls.append(f"verify_split_blocks from {len(contributions)} rank(s)")
        self.inner.verify_split_blocks(contributions)


def test_a_reader_of_the_role_gets_joint_verification(tmp_path: Path) -> None:
    distcp.save({"w": torch.arange(6.0)}, checkpoint_id=tmp_path, no_dist=True)
    reader = Delegating(tmp_path)
    assert isinstance(reader, JointlyVerifyingReader)
    loaded = {"w": torch.zeros(6)}
    distcp.load(loaded, storage_reader=reader, no_dist=True)
    assert loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert reader.calls == [
        "set_up joint=True",
        "masked_checksums",
        "verify_split_blocks from 1 rank(s)",
    ]


def test_torchs_reader_plays_no_extra_role(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as torch_dcp

    assert not isinstance(torch_dcp.FileSystemReader(str(tmp_path)), JointlyVerifyingReader)
    assert not isinstance(torch_dcp.FileSystemWriter(str(tmp_path)), ReleasingWriter)
    assert isinstance(distcp.FileSystemWriter(tmp_path), ReleasingWriter)
