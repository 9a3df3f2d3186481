"""A fault campaign over a save into an existing checkpoint, on 1 and 2 ranks:
SIGKILL of a rank at every I/O step and every collective, and ENOSPC and EIO
at every I/O step (``fault_injection.py`` numbers them). After each run:

- the checkpoint at the path loads, and holds the old state or the new one,
  whole: never a mix, never garbage;
- what each surviving rank was told matches it: a save that returned means
  the new state is there, ``CommitOutcomeUnknownError`` either, any other
  error the old state.

Each run is a fresh process (or two, with a gloo group) forked from a server
that has torch and distcp imported: about 250 runs, a minute and a half on two
cores. ``DISTCP_FAULT_CAMPAIGN=full`` adds the same campaign on 3 ranks.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distcp
from fault_injection import injecting

FULL = os.environ.get("DISTCP_FAULT_CAMPAIGN") == "full"
OLD, NEW = 1.0, 2.0
KEYS = [f"layer{n}.weight" for n in range(6)]
pytestmark = pytest.mark.timeout(600)
_FULL_ONLY = "long run: DISTCP_FAULT_CAMPAIGN=full"


def state(value: float) -> dict[str, Any]:
    """Plain tensors every rank holds (written once, shared out over the
    ranks), of several sizes, and a value."""
    tensors: dict[str, Any] = {
        key: torch.full((64 * (n + 1), 33), value) for n, key in enumerate(KEYS)
    }
    tensors["step"] = int(value)
    return tensors


def on_disk(path: Path) -> float:
    """OLD or NEW: the whole checkpoint at ``path`` holds one of them."""
    loaded = {key: torch.zeros_like(tensor) for key, tensor in state(0.0).items() if key != "step"}
    loaded["step"] = None
    distcp.load(loaded, checkpoint_id=path, no_dist=True)
    values = {
        float(loaded[key].unique().item()) for key in KEYS if loaded[key].unique().numel() == 1
    }
    mixed = any(loaded[key].unique().numel() != 1 for key in KEYS) or len(values) != 1
    assert not mixed, f"a mixed checkpoint: {[loaded[k].unique().tolist() for k in KEYS]}"
    (value,) = values
    assert loaded["step"] == int(value), (loaded["step"], value)
    assert value in (OLD, NEW)
    return value


def worker(
    rank: int, world: int, port: int, root: str, fault: str, at: int | None, target: int, out: Any
) -> None:
    """One rank of one run: save NEW over OLD with the fault armed on rank
    ``target``; report ``(rank, outcome, error type, events)`` unless killed."""
    try:
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        with injecting(root, fault, at if rank == target else None) as injector:
            try:
                distcp.save(state(NEW), checkpoint_id=root, no_dist=world == 1, timeout=20)
                outcome, error = "saved", ""
            except distcp.CheckpointError as raised:
                outcome, error = "raised", type(raised).__name__
        out.put((rank, outcome, error, injector.events))
    except BaseException:
        out.put((rank, "crashed", traceback.format_exc(), []))
    finally:
        out.close()
        out.join_thread()  # the report is sent before the process ends
        os._exit(0)  # no teardown of a group whose peer may be dead


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Campaign:
    def __init__(self, root: Path, world: int) -> None:
        self.root, self.world = root, world
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["torch", "distcp", "fault_injection"])

    def reset(self) -> None:
        distcp.save(state(OLD), checkpoint_id=self.root, no_dist=True)
        assert on_disk(self.root) == OLD

    def run(self, fault: str, at: int | None, rank: int) -> list[tuple[int, str, str, list[str]]]:
        out = self.context.Queue()
        port = free_port()
        processes = [
            self.context.Process(
                target=worker, args=(r, self.world, port, str(self.root), fault, at, rank, out)
            )
            for r in range(self.world)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(90)
            assert process.exitcode is not None, "a rank hung past distcp's timeout"
        reports = []
        while not out.empty() or len(reports) < sum(p.exitcode == 0 for p in processes):
            reports.append(out.get(timeout=10))
        for report in reports:
            assert report[1] != "crashed", report[2]
        return sorted(reports)


def check(campaign: Campaign, fault: str, at: int, rank: int) -> str:
    reports = campaign.run(fault, at, rank)
    found = on_disk(campaign.root)
    for _, outcome, error, _ in reports:
        where = f"{fault} at event {at} of rank {rank} ({_event(reports, rank, at)})"
        if outcome == "saved":
            assert found == NEW, f"{where}: the save returned, but the old state is there"
        elif error != "CommitOutcomeUnknownError":
            assert found == OLD, f"{where}: the save raised {error}, but the new state is there"
    if fault == "kill":
        assert rank not in [report[0] for report in reports], "the killed rank reported"
    return "new" if found == NEW else "old"


def _event(reports: list[Any], rank: int, at: int) -> str:
    for report in reports:
        if report[0] == rank and at < len(report[3]):
            return report[3][at]
    return "?"


@pytest.fixture(
    params=[1, 2, pytest.param(3, marks=pytest.mark.skipif(not FULL, reason=_FULL_ONLY))],
    ids=["1-rank", "2-ranks", "3-ranks"],
)
def campaign(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Campaign]:
    yield Campaign(tmp_path / "ckpt", request.param)


def test_every_fault_leaves_old_or_new_and_the_caller_told_which(campaign: Campaign) -> None:
    campaign.reset()
    counted = campaign.run("count", None, 0)
    assert [report[1] for report in counted] == ["saved"] * campaign.world
    assert on_disk(campaign.root) == NEW
    outcomes: dict[str, set[str]] = {}
    for rank, _, _, events in counted:
        io_events = [n for n, what in enumerate(events) if not what.startswith(_COLLECTIVE)]
        assert io_events and (campaign.world == 1 or len(io_events) < len(events))
        for at, what in enumerate(events):
            faults = ["kill"]
            if at in io_events:
                faults += ["ENOSPC", "EIO"]
            for fault in faults:
                campaign.reset()
                result = check(campaign, fault, at, rank)
                outcomes.setdefault(f"{fault} {what.split()[0]}", set()).add(result)
    # Faults before the commit keep the old state, late ones the new: both happened.
    assert {"old", "new"} <= set().union(*outcomes.values()), outcomes


_COLLECTIVE = ("gather_object", "scatter_object_list", "broadcast_object_list", "monitored_barrier")
