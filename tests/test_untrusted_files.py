"""What a load opens: only regular files inside the checkpoint, through the
descriptor it checked. A symbolic link (out of the checkpoint or in a loop),
a FIFO or a file deleted by a racing save ends in ``CorruptCheckpointError``
naming the file; nothing outside the directory is read and nothing hangs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import distcp
from distcp.filesystem.layout import METADATA_FILE_NAME

pytestmark = pytest.mark.timeout(60)  # a FIFO that blocked an open would hang here


def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {"w": torch.arange(64, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    path = tmp_path / "ckpt"
    distcp.save(state, checkpoint_id=path, no_dist=True)
    return path, state


def data_files(path: Path) -> list[Path]:
    return sorted(path.glob("data-*.distcp"))


def load(path: Path) -> dict[str, torch.Tensor]:
    fresh = {"w": torch.zeros(64), "b": torch.zeros(3, dtype=torch.int64)}
    distcp.load(fresh, checkpoint_id=path, no_dist=True)
    return fresh


def test_a_data_file_linked_to_identical_bytes_outside_is_refused(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    for data in data_files(path):
        outside = tmp_path / f"outside-{data.name}"
        shutil.copyfile(data, outside)  # same size, same checksums: only the link differs
        data.unlink()
        data.symlink_to(outside)
    with pytest.raises(distcp.CorruptCheckpointError, match="symbolic link") as caught:
        load(path)
    assert caught.value.file is not None and caught.value.file.startswith(str(path))


def test_a_symlink_loop_is_corruption_not_an_os_error(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    data = data_files(path)[0]
    data.unlink()
    data.symlink_to(data.name)  # points at itself
    with pytest.raises(distcp.CorruptCheckpointError, match=data.name):
        load(path)


def test_a_metadata_file_linked_from_outside_is_refused(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    other, _ = saved(tmp_path / "other")
    (path / METADATA_FILE_NAME).unlink()
    (path / METADATA_FILE_NAME).symlink_to(other / METADATA_FILE_NAME)
    with pytest.raises(distcp.CorruptCheckpointError, match=r"metadata file.*symbolic link"):
        load(path)


@pytest.mark.parametrize("which", ["data", "metadata"])
def test_a_fifo_in_place_of_a_file_fails_at_once(tmp_path: Path, which: str) -> None:
    path, _ = saved(tmp_path)
    target = data_files(path)[0] if which == "data" else path / METADATA_FILE_NAME
    target.unlink()
    os.mkfifo(target)  # nobody ever writes to it: a blocking open would never return
    with pytest.raises(distcp.CorruptCheckpointError, match="FIFO"):
        load(path)


def test_the_checked_descriptor_is_the_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file swapped after the reader opened it cannot change what is read:
    the reader reads the file it checked (so a check-then-open race is gone)."""
    path, state = saved(tmp_path)
    from distcp.filesystem import file_mappings

    opened = file_mappings.OpenFile.__init__

    def open_then_swap(self: Any, file: Path) -> None:
        opened(self, file)
        file.unlink()  # the name now points nowhere (or at anything else)
        os.mkfifo(file)

    monkeypatch.setattr(file_mappings.OpenFile, "__init__", open_then_swap)
    fresh = load(path)
    assert torch.equal(fresh["w"], state["w"]) and torch.equal(fresh["b"], state["b"])


class DeletesDataFiles(distcp.DefaultLoadPlanner):
    """Plays a save committing into the same directory: its cleanup removes
    the data files after this load read the metadata."""

    def create_local_plan(self) -> Any:
        plan = super().create_local_plan()
        for data in data_files(self.checkpoint):
            data.unlink()
        return plan


def test_a_load_racing_a_saves_cleanup_says_the_file_is_missing(tmp_path: Path) -> None:
    path, _ = saved(tmp_path)
    planner = DeletesDataFiles()
    planner.checkpoint = path  # type: ignore[attr-defined]
    fresh = {"w": torch.zeros(64), "b": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(distcp.CorruptCheckpointError, match="is missing"):
        distcp.load(fresh, checkpoint_id=path, planner=planner, no_dist=True)
