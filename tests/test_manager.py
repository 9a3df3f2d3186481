"""distcp.manager.CheckpointManager: interval, retention, async, resume,
trainable-only and weights-only saves, telemetry; on 1 and 2 ranks."""

from __future__ import annotations

import builtins
import copy
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.manager_ranks import background_error_everywhere, load_latest_on, save_steps, weights
from torch import nn

import distcp
from distcp.manager import CheckpointManager


def state_at(step: int) -> dict[str, Any]:
    return {"w": weights(step), "step": step}


def loaded_step(root: Path, **kwargs: Any) -> tuple[int | None, dict[str, Any]]:
    state = {"w": torch.zeros(8, 6), "step": -1}
    with CheckpointManager(root, **kwargs) as manager:
        step = manager.load(state)
    return step, state


def test_interval_force_and_queries(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, interval=3) as manager:
        assert manager.latest_step() is None and manager.load(state_at(0)) is None
        saved = [step for step in range(1, 8) if manager.save(step, state_at(step))]
        assert saved == [3, 6]
        assert manager.save(7, state_at(7), force=True)
        assert manager.all_steps() == [3, 6, 7] and manager.latest_step() == 7
    step, state = loaded_step(tmp_path)
    assert step == 7 and torch.equal(state["w"], weights(7)) and state["step"] == 7
    with CheckpointManager(tmp_path) as manager:
        fresh = state_at(0)
        assert manager.load(fresh, step=3) == 3 and torch.equal(fresh["w"], weights(3))


@pytest.mark.parametrize("mode", [None, "thread", "process"])
def test_retention_keeps_the_newest_and_every_nth(tmp_path: Path, mode: str | None) -> None:
    seen: list[list[int]] = []
    with CheckpointManager(
        tmp_path, async_mode=mode, keep_latest_k=2, keep_every_n_steps=4
    ) as manager:
        for step in range(1, 10):
            manager.save(step, state_at(step))
            committed = manager.all_steps()
            seen.append(committed)
            if mode is None or step > 1:  # an async save of step 1 may still be in flight
                assert committed, f"no committed step after saving step {step}"
    assert manager.all_steps() == [4, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == [
        "step-4",
        "step-8",
        "step-9",
    ]
    for committed in seen:  # the newest committed step was never deleted
        assert committed == sorted(committed)
    step, state = loaded_step(tmp_path)
    assert step == 9 and torch.equal(state["w"], weights(9))


def test_resume_skips_a_crashed_step_and_cleans_it(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as manager:
        manager.save(4, state_at(4))
    crashed = tmp_path / "step-5"
    crashed.mkdir()
    (crashed / "data-0123456789abcdef-00000-000.distcp").write_bytes(b"half")
    step, state = loaded_step(tmp_path)
    assert step == 4 and torch.equal(state["w"], weights(4))
    with CheckpointManager(tmp_path, keep_latest_k=3) as manager:
        manager.save(6, state_at(6))
    assert not crashed.exists()  # older than the newest committed step: a crashed save
    assert manager.all_steps() == [4, 6]


def test_when_busy_skip_drops_a_save_while_one_is_in_flight(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with CheckpointManager(
        tmp_path, async_mode="thread", when_busy="skip", on_event=events.append
    ) as manager:
        big = {"w": torch.randn(4 << 20)}
        started = [manager.save(step, big) for step in range(1, 4)]
    assert started[0] and not all(started)  # some skipped while the first was written
    assert any(e["event"] == "save_skipped" for e in events)
    assert manager.all_steps() == [n + 1 for n, ok in enumerate(started) if ok]


def test_a_kill_at_any_point_of_save_and_purge_leaves_a_loadable_latest_step(
    tmp_path: Path,
) -> None:
    """Fork a child that saves step 3 with keep_latest_k=1 (so it also purges
    steps 1 and 2) and is SIGKILLed at its k-th file operation, for every k
    until a child runs to the end: the root always loads, at step 2 or 3."""
    template = tmp_path / "template"
    with CheckpointManager(template) as manager:
        manager.save(1, state_at(1))
        manager.save(2, state_at(2))
    outcomes = set()
    for kill_at in range(1, 200):
        root = tmp_path / f"run-{kill_at}"
        shutil.copytree(template, root)
        pid = os.fork()
        if pid == 0:  # the child: save, purge, die at the kill_at-th operation
            _die_at(kill_at)
            try:
                with CheckpointManager(root, keep_latest_k=1) as manager:
                    manager.save(3, state_at(3))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        step, state = loaded_step(root)
        assert step in (2, 3), (kill_at, step)
        assert torch.equal(state["w"], weights(step)) and state["step"] == step
        outcomes.add((killed, step))
        if not killed:
            print(f"{kill_at - 1} kill points, each leaving a loadable root")
            with CheckpointManager(root) as manager:
                assert manager.all_steps() == [3]
            break
    else:
        raise AssertionError("the child never ran to the end")
    assert (True, 2) in outcomes and (True, 3) in outcomes and (False, 3) in outcomes


def _die_at(count: int) -> None:
    """In a forked child: SIGKILL this process at the count-th file operation."""
    seen = [0]

    def tick() -> None:
        seen[0] += 1
        if seen[0] >= count:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            tick()
            return real(*args, **kwargs)

        setattr(owner, name, call)

    for name in ("replace", "unlink", "rmdir", "fsync", "mkdir"):
        wrap(os, name)
    real_open = builtins.open

    def opening(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = opening


def test_a_background_error_surfaces_on_every_rank(
    tmp_path: Path, rank_pool: Callable[[int], Any]
) -> None:
    messages = rank_pool(2).run(background_error_everywhere, str(tmp_path))
    assert all("rank(s) 1" in m and "injected" in m for m in messages), messages


def test_resume_on_another_world_size(tmp_path: Path, rank_pool: Callable[[int], Any]) -> None:
    assert rank_pool(2).run(save_steps, str(tmp_path), [1, 2, 3], "thread") == [[2, 3]] * 2
    assert rank_pool(1).run(load_latest_on, str(tmp_path)) == [3]
    assert rank_pool(2).run(load_latest_on, str(tmp_path)) == [3, 3]


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model.register_buffer("seen", torch.tensor(0))
    return model


def test_trainable_only_saves_the_trainable_and_loads_the_frozen_from_the_base(
    tmp_path: Path,
) -> None:
    model = _model()
    distcp.save({"model": model}, checkpoint_id=tmp_path / "base", no_dist=True)
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)  # fine-tune the head only
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    model.seen += 5
    with CheckpointManager(
        tmp_path / "run", trainable_only=True, base_checkpoint=tmp_path / "base"
    ) as manager:
        manager.save(1, {"model": model, "optim": optimizer})
    stored = distcp.FileSystemReader(tmp_path / "run" / "step-1").read_metadata()
    keys = set(stored.state_dict_metadata)
    assert "model.2.weight" in keys and "model.seen" in keys
    assert "model.0.weight" not in keys and "model.0.bias" not in keys
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    fresh.register_buffer("seen", torch.tensor(0))
    for parameter in fresh[0].parameters():
        parameter.requires_grad_(False)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    fresh(torch.randn(3, 16)).sum().backward()
    fresh_optimizer.step()  # an optimizer's state exists once it stepped
    with CheckpointManager(tmp_path / "run") as manager:
        assert manager.load({"model": fresh, "optim": fresh_optimizer}) == 1
    for (name, ours), theirs in zip(
        model.state_dict().items(), fresh.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_weights_only_bf16_export_loads_into_a_bf16_model(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(tmp_path) as manager:
        manager.save(10, {"model": model, "optim": optimizer})
        location = manager.export_weights(10, {"model": model, "optim": optimizer})
        assert manager.all_steps() == [10]  # an export is not a step
    metadata = distcp.FileSystemReader(location).read_metadata()
    assert set(metadata.state_dict_metadata) == {f"model.{k}" for k in model.state_dict()}
    dtypes = {k: e.properties.dtype for k, e in metadata.state_dict_metadata.items()}
    assert dtypes["model.0.weight"] == torch.bfloat16 and dtypes["model.seen"] == torch.int64
    half = copy.deepcopy(model).to(torch.bfloat16)
    for parameter in half.parameters():
        parameter.data.zero_()
    distcp.load({"model": half}, checkpoint_id=location, no_dist=True)
    for name, tensor in model.state_dict().items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(half.state_dict()[name], expected), name


def test_telemetry_reaches_the_log_file_and_the_callback(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with CheckpointManager(tmp_path, on_event=events.append) as manager:
        manager.save(1, state_at(1))
        manager.load(state_at(0))
    with CheckpointManager(tmp_path, async_mode="thread", on_event=events.append) as manager:
        manager.save(2, state_at(2))
    saves = [e for e in events if e["event"] == "save"]
    assert set(saves[0]["phases"]) == {"plan", "write", "commit"} and saves[0]["bytes"] > 0
    assert set(saves[1]["phases"]) == {"plan", "stage", "write", "commit"}
    assert 0 < saves[1]["blocking_s"] <= saves[1]["seconds"]
    (loaded,) = [e for e in events if e["event"] == "load"]
    assert set(loaded["phases"]) == {"plan", "read", "verify"} and loaded["bytes"] > 0
    lines = [
        json.loads(line) for line in (tmp_path / "checkpoint-log.jsonl").read_text().splitlines()
    ]
    assert [(line["event"], line["step"]) for line in lines] == [
        ("save", 1),
        ("load", 1),
        ("save", 2),
    ]
    assert all(line["ranks"][0]["rank"] == 0 for line in lines)


def test_on_an_object_store_root(tmp_path: Path) -> None:
    root = "memory://manager-tests/run"
    with CheckpointManager(root, keep_latest_k=1) as manager:
        for step in (1, 2, 3):
            manager.save(step, state_at(step))
    assert manager.all_steps() == [3]
    state = state_at(0)
    with CheckpointManager(root) as manager:
        assert manager.load(state) == 3
    assert torch.equal(state["w"], weights(3))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointArgumentError, match="interval"):
        CheckpointManager(tmp_path, interval=0)
    with pytest.raises(distcp.CheckpointArgumentError, match="base_checkpoint"):
        CheckpointManager(tmp_path, trainable_only=True)
    with pytest.raises(distcp.CheckpointArgumentError, match="async_mode"):
        CheckpointManager(tmp_path, async_mode="fork")
    manager = CheckpointManager(tmp_path)
    manager.close()
    with pytest.raises(distcp.CheckpointArgumentError, match="closed"):
        manager.save(1, state_at(1))


def test_a_step_saved_without_the_manager_loads_through_it(tmp_path: Path) -> None:
    distcp.save(state_at(5), checkpoint_id=tmp_path / "step-5", no_dist=True)
    step, state = loaded_step(tmp_path)
    assert step == 5 and torch.equal(state["w"], weights(5)) and state["step"] == 5
