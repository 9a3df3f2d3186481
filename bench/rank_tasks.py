"""What each rank process does when the driver asks; every function takes
``(rank, world_size, ...)`` and runs on all ranks at once (see ``distcp.testing.RankPool``).

A rank keeps the scenario's state between calls in ``_held``: the tensors it
saves (its part of the state, in the save layout), the tensors it loads into
(preallocated and resident before anything is timed) and the memcpy source.
"""

from __future__ import annotations

import gc
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from bench.measure import PeakRss, timed
from bench.peers import PEERS, OpContext, memcpy_source
from bench.scenarios import Phase, Scenario, local_tensor, make_state, verify

_held: dict[str, Any] = {}


def start(rank: int, world_size: int) -> str:
    """Once per process: import the libraries, make the device mesh, freeze the
    objects that exist by then out of the garbage collector's way (the collection
    before each op then takes microseconds, not 0.1 s), and choose the
    peak-memory method; returns the latter."""
    warnings.filterwarnings("ignore")  # the report is the output; library chatter is not
    import torch.distributed.checkpoint  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh

    import distcp  # noqa: F401

    _held["mesh"] = init_device_mesh("cpu", (world_size,))
    _held["peak"] = PeakRss()
    gc.collect()
    gc.freeze()
    return str(_held["peak"].method)


def set_up_scenario(rank: int, world_size: int, scenario: Scenario) -> int:
    """Build this rank's part of the state to save; returns its bytes."""
    tear_down(rank, world_size)
    source = make_state(scenario.specs, scenario.save_layout, rank, _held["mesh"], fill=True)
    _held["source"] = source
    return sum(local_tensor(v).nbytes for v in source.values())


def set_up_phase(
    rank: int, world_size: int, scenario: Scenario, phase: Phase, memcpy: bool
) -> None:
    """For a load: allocate the tensors to load into and, if asked, the memcpy source."""
    _held.pop("dest", None)
    _held.pop("memcpy_source", None)
    gc.collect()
    if phase.op == "load":
        _held["dest"] = make_state(scenario.specs, phase.layout, rank, _held["mesh"], fill=False)
        if memcpy:
            _held["memcpy_source"] = memcpy_source(scenario.specs, phase.layout, rank)


def clear_destination(rank: int, world_size: int) -> None:
    for value in _held.get("dest", {}).values():
        local_tensor(value).zero_()


def run_op(
    rank: int,
    world_size: int,
    library: str,
    scenario: Scenario,
    phase: Phase,
    path: str,
    threads: int,
) -> dict[str, Any]:
    """Save or load with ``library``, timed between barriers on every rank."""
    peer = PEERS[library]
    state = _held["source"] if phase.op == "save" else _held["dest"]
    context = OpContext(
        rank=rank,
        path=Path(path),
        threads=threads,
        specs=scenario.specs,
        layout=phase.layout,
        save_layout=scenario.save_layout,
        state=state,
        no_dist=phase.layout.kind == "single",
        memcpy_source=_held.get("memcpy_source"),
    )
    active = phase.layout.active(rank)

    def operation() -> dict[str, Any]:
        if not active:
            return {}
        try:
            return peer.save(context) if phase.op == "save" else peer.load(context)
        except Exception:  # reported per library; the barrier after still runs
            return {"error": traceback.format_exc()}

    result = timed(operation, _held["peak"])
    result["active"] = active
    return result


def check(rank: int, world_size: int, scenario: Scenario, phase: Phase) -> list[str]:
    """Keys whose loaded bytes on this rank differ from what was saved."""
    if not phase.layout.active(rank):
        return []
    return verify(scenario.specs, phase.layout, rank, _held["dest"])


def run_checked_op(
    rank: int,
    world_size: int,
    library: str,
    scenario: Scenario,
    phase: Phase,
    path: str,
    threads: int,
) -> dict[str, Any]:
    """``run_op``, and for a load: into zeroed tensors, then the keys that differ
    from what was saved (``mismatched``), unless the library does not claim to
    have loaded them (``facts["exact"]`` false) or failed."""
    if phase.op == "load":
        clear_destination(rank, world_size)
    result = run_op(rank, world_size, library, scenario, phase, path, threads)
    facts = result["facts"]
    if phase.op == "load" and facts.get("exact", True) and "error" not in facts:
        result["mismatched"] = check(rank, world_size, scenario, phase)
    return result


def tear_down(rank: int, world_size: int) -> None:
    for name in ("source", "dest", "memcpy_source"):
        _held.pop(name, None)
    gc.collect()


def torch_threads(rank: int, world_size: int) -> int:
    return torch.get_num_threads()
