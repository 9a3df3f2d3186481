"""The garbage collector is paused during a save or load and resumed after,
also when they fail, and nested or concurrent pauses resume it only once the
last ends (a caller that had it off keeps it off)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distcp
from distcp.gc_pause import gc_paused


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


class Spy(distcp.DefaultLoadPlanner):
    """Records whether the collector ran during planning."""

    seen: list[bool] = []

    def create_local_plan(self) -> distcp.LoadPlan:
        Spy.seen.append(gc.isenabled())
        return super().create_local_plan()


def test_save_and_load_pause_the_collector_and_resume_it(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4)}
    distcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    assert gc.isenabled()
    Spy.seen.clear()
    distcp.load({"w": torch.zeros(4, 4)}, checkpoint_id=tmp_path, planner=Spy(), no_dist=True)
    assert Spy.seen == [False] and gc.isenabled()


def test_a_failed_load_resumes_the_collector(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointNotFoundError):
        distcp.load({"w": torch.zeros(1)}, checkpoint_id=tmp_path / "missing", no_dist=True)
    assert gc.isenabled()


def test_a_caller_that_turned_the_collector_off_keeps_it_off(tmp_path: Path) -> None:
    gc.disable()
    distcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path, no_dist=True)
    assert not gc.isenabled()


def test_nested_and_concurrent_pauses_resume_when_the_last_ends() -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with gc_paused():
        thread.start()
        assert inside.wait(10)
        with gc_paused():
            assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    thread.join(10)
    assert gc.isenabled()
