"""What a caller is told matches what is on disk (docs/format.md §7):

- a failure after the commit point (fsyncing the directory, the probe,
  removing superseded files) is a ``CommitWarning``; the save returns and the
  new checkpoint is the one at the path;
- two saves into one directory at once: the second fails at once with
  ``ConcurrentSaveError``, before writing anything, and the first commits;
- a rank that hangs makes every live rank raise ``CollectiveTimeoutError``
  within distcp's timeout, naming the step and the rank.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import distcp
from distcp.filesystem import layout
from distcp.filesystem.directory_lock import lock_file_name
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]


def value_at(path: Path) -> float:
    loaded = {"x": torch.zeros(4)}
    distcp.load(loaded, checkpoint_id=path, no_dist=True)
    return float(loaded["x"][0])


def save_value(path: Path, value: float) -> None:
    distcp.save({"x": torch.full((4,), value)}, checkpoint_id=path, no_dist=True)


def eio(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EIO, "Input/output error (injected)")


@pytest.mark.parametrize("after_commit", ["fsync_directory", "unlink", "probe"])
def test_a_failure_after_the_commit_point_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_commit: str
) -> None:
    save_value(tmp_path, 1.0)
    if after_commit == "fsync_directory":
        monkeypatch.setattr(layout, "fsync_directory", eio)
    elif after_commit == "unlink":
        monkeypatch.setattr(os, "unlink", eio)
    else:  # the probe's temporary file cannot be created
        real_open = builtins.open

        def no_probe(file: Any, *args: Any, **kwargs: Any) -> Any:
            if ".metadata.tmp-" in str(file):
                eio()
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(layout, "open", no_probe, raising=False)
    with pytest.warns(distcp.CommitWarning, match=f"committed {tmp_path}"):
        metadata = distcp.save({"x": torch.full((4,), 2.0)}, checkpoint_id=tmp_path, no_dist=True)
    assert metadata is not None
    monkeypatch.undo()
    assert value_at(tmp_path) == 2.0  # the save said "committed", and it is


def test_a_failure_before_the_commit_point_raises_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_value(tmp_path, 1.0)
    monkeypatch.setattr(os, "replace", eio)  # the rename itself: the commit point
    with pytest.raises(distcp.CheckpointError, match="injected"):
        save_value(tmp_path, 2.0)
    monkeypatch.undo()
    assert value_at(tmp_path) == 1.0
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_failed_save_releases_the_directory_for_a_retry(tmp_path: Path) -> None:
    class Failing(distcp.DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    writer = distcp.FileSystemWriter(tmp_path)
    with pytest.raises(distcp.CheckpointError, match="injected"):
        distcp.save({"x": torch.ones(4)}, storage_writer=writer, planner=Failing(), no_dist=True)
    save_value(tmp_path, 3.0)  # a retry with a new writer in the same process
    distcp.save({"x": torch.full((4,), 4.0)}, storage_writer=writer, no_dist=True)  # and the old
    assert value_at(tmp_path) == 4.0


HOLDER = textwrap.dedent(
    """
    import sys, time, torch, distcp
    class Slow(distcp.DefaultSavePlanner):
        def create_local_plan(self):
            print("planning", flush=True)
            time.sleep(float(sys.argv[2]))
            return super().create_local_plan()
    distcp.save({"x": torch.full((4,), 5.0)}, checkpoint_id=sys.argv[1], planner=Slow(),
                no_dist=True)
    print("saved", flush=True)
    """
)


def test_a_second_save_into_a_directory_in_use_fails_and_the_first_commits(
    tmp_path: Path,
) -> None:
    save_value(tmp_path, 1.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "planning"
        with pytest.raises(distcp.ConcurrentSaveError, match=rf"pid {holder.pid} on"):
            save_value(tmp_path, 2.0)
        assert holder.wait(60) == 0
    finally:
        holder.kill()
    assert value_at(tmp_path) == 5.0  # the first save's, whole
    save_value(tmp_path, 6.0)  # the lock went with the process
    assert value_at(tmp_path) == 6.0
    assert (tmp_path / lock_file_name()).exists()


def test_a_killed_saver_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "planning"
    holder.kill()
    holder.wait(30)
    save_value(tmp_path, 7.0)
    assert value_at(tmp_path) == 7.0


HANG_S = 5.0


class HangsOnRank(distcp.DefaultSavePlanner):
    def __init__(self, rank: int, seconds: float) -> None:
        super().__init__()
        self.hang_rank, self.seconds = rank, seconds

    def create_local_plan(self) -> Any:
        if self.rank_now == self.hang_rank:
            time.sleep(self.seconds)
        return super().create_local_plan()


def hung_rank_save(rank: int, world_size: int, path: str, hung: int) -> tuple[str, str, float]:
    planner = HangsOnRank(hung, seconds=HANG_S)
    planner.rank_now = rank  # type: ignore[attr-defined]
    try:
        distcp.save({"w": torch.full((2,), float(rank))}, checkpoint_id=path, planner=planner,
                    timeout=1.5)  # fmt: skip
    except distcp.CheckpointError as error:
        missing = getattr(error, "missing", ())
        return type(error).__name__, f"{missing} {error}", time.monotonic()
    return "saved", "", time.monotonic()


@pytest.mark.parametrize("hung", [1, 0], ids=["a-worker-hangs", "the-coordinator-hangs"])
def test_a_hung_rank_makes_the_others_raise_within_the_timeout(
    tmp_path: Path, rank_pool: PoolFactory, hung: int
) -> None:
    outcomes = rank_pool(3).run(hung_rank_save, str(tmp_path), hung, timeout_s=120)
    for rank, (kind, message, _) in enumerate(outcomes):
        if rank != hung:
            assert kind == "CollectiveTimeoutError", (rank, message)
            assert "planning the save" in message and "within 1.5 s" in message
            assert f"({hung},)" in message or (rank != 0 and "(0,)" in message), message
    live = [finished for rank, (_, _, finished) in enumerate(outcomes) if rank != hung]
    woke = outcomes[hung][2]  # the hung rank finished just after it woke up
    assert max(live) < woke - 1.0  # the live ranks did not wait for it
    assert not (tmp_path / layout.METADATA_FILE_NAME).exists()  # nothing committed


def test_the_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        distcp.save({"x": torch.ones(1)}, checkpoint_id="unused", timeout=0, no_dist=True)


def test_distcp_save_still_works_after_a_timeout(tmp_path: Path, rank_pool: PoolFactory) -> None:
    """The broken timed group is dropped: the pool's next save runs normally."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = rank_pool(3).run(hung_rank_save, str(tmp_path), -1, timeout_s=120)
    assert [kind for kind, _, _ in results] == ["saved"] * 3


def test_a_retry_inside_the_except_block_of_a_failed_torch_driven_save(tmp_path: Path) -> None:
    """torch's dcp.save has no hook for a failed save, and the traceback keeps
    the failed writer alive during a retry: this process's new save takes the
    lock over instead of reporting itself as a concurrent save."""
    import torch.distributed.checkpoint as torch_dcp

    class Failing(torch_dcp.DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            raise OSError(errno.EIO, "Input/output error (injected)")

    writer = distcp.FileSystemWriter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch_dcp.save({"x": torch.ones(4)}, storage_writer=writer, planner=Failing())
        except BaseException:
            save_value(tmp_path, 8.0)  # `writer` (and its lock) is still alive here
    assert value_at(tmp_path) == 8.0
