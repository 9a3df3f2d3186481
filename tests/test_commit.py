"""The commit protocol on one process: metadata last and atomic, incomplete
checkpoints refused, overwrite control, and cleanup of superseded files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distcp
from distcp.filesystem.directory_lock import lock_file_name
from distcp.filesystem.layout import METADATA_FILE_NAME, PROBE_FILE_NAME
from snapshots import checkpoint_bytes as snapshot


def test_metadata_is_the_commit_marker(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(3)}, checkpoint_id=tmp_path, no_dist=True)
    (tmp_path / METADATA_FILE_NAME).unlink()
    with pytest.raises(distcp.IncompleteCheckpointError, match="did not finish"):
        distcp.load({"a": torch.zeros(3)}, checkpoint_id=tmp_path, no_dist=True)


def test_missing_checkpoint_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distcp.load({"a": torch.zeros(3)}, checkpoint_id=tmp_path / "nope", no_dist=True)


def test_overwrite_can_be_refused(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(3)}, checkpoint_id=tmp_path, no_dist=True)
    before = snapshot(tmp_path)
    writer = distcp.FileSystemWriter(tmp_path, overwrite=False)
    with pytest.raises(distcp.CheckpointExistsError, match="overwrite=False"):
        distcp.save({"a": torch.zeros(3)}, storage_writer=writer, no_dist=True)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_and_removes_superseded_files(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(1000)}, checkpoint_id=tmp_path, no_dist=True)
    first = {p.name for p in tmp_path.iterdir()}
    (tmp_path / "notes.txt").write_text("user file, not ours")
    distcp.save({"a": torch.full((1000,), 2.0)}, checkpoint_id=tmp_path, no_dist=True)
    second = {p.name for p in tmp_path.iterdir()}
    kept = {METADATA_FILE_NAME, PROBE_FILE_NAME, lock_file_name()}
    assert not (first - kept) & second, "old data files must be removed"
    assert "notes.txt" in second
    target = {"a": torch.zeros(1000)}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["a"], torch.full((1000,), 2.0))


def test_failed_save_leaves_the_previous_checkpoint_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = {"a": torch.randn(100), "step": 1}
    distcp.save(original, checkpoint_id=tmp_path, no_dist=True)
    before = snapshot(tmp_path)

    class FailingWriter(distcp.FileSystemWriter):
        def finish(
            self, metadata: distcp.Metadata, results: list[list[distcp.WriteResult]]
        ) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(distcp.CheckpointError, match="No space left"):
        distcp.save(
            {"a": torch.zeros(100), "step": 2}, storage_writer=FailingWriter(tmp_path), no_dist=True
        )
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    target = {"a": torch.empty(100), "step": 0}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["a"], original["a"]) and target["step"] == 1


def test_failed_write_removes_its_own_partial_files(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(10)}, checkpoint_id=tmp_path, no_dist=True)
    before = snapshot(tmp_path)

    class Exploding(distcp.DefaultSavePlanner):
        def resolve_data(self, write_item: distcp.WriteItem):  # type: ignore[no-untyped-def]
            if write_item.index.fqn == "b":
                raise RuntimeError("device lost")
            return super().resolve_data(write_item)

    with pytest.raises(distcp.CheckpointError, match="device lost"):
        distcp.save(
            {"a": torch.zeros(10), "b": torch.zeros(10)},
            checkpoint_id=tmp_path,
            planner=Exploding(),
            no_dist=True,
        )
    assert snapshot(tmp_path) == before


def test_next_successful_save_removes_leftovers_of_a_crashed_one(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(10)}, checkpoint_id=tmp_path, no_dist=True)
    crashed = tmp_path / "data-0123456789abcdef-00003-000.distcp"
    crashed.write_bytes(b"partial")
    stale_tmp = tmp_path / f"{METADATA_FILE_NAME}.tmp-0123456789abcdef"
    stale_tmp.write_bytes(b"partial")
    target = {"a": torch.zeros(10)}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)  # leftovers do not disturb loads
    assert torch.equal(target["a"], torch.ones(10))
    distcp.save({"a": torch.ones(10)}, checkpoint_id=tmp_path, no_dist=True)
    assert not crashed.exists() and not stale_tmp.exists()


def test_sync_files_off_still_commits(tmp_path: Path) -> None:
    writer = distcp.FileSystemWriter(tmp_path, sync_files=False)
    distcp.save({"a": torch.arange(5)}, storage_writer=writer, no_dist=True)
    target = {"a": torch.zeros(5, dtype=torch.int64)}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["a"], torch.arange(5))


def test_cleanup_recognises_high_file_and_rank_numbers(tmp_path: Path) -> None:
    distcp.save({"a": torch.ones(2)}, checkpoint_id=tmp_path, no_dist=True)
    leftovers = [
        tmp_path / "data-0123456789abcdef-00000-1000.distcp",
        tmp_path / "data-0123456789abcdef-123456-000.distcp",
    ]
    for path in leftovers:
        path.write_bytes(b"x")
    distcp.save({"a": torch.ones(2)}, checkpoint_id=tmp_path, no_dist=True)
    assert not any(path.exists() for path in leftovers)
