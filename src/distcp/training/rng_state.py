"""``RNGState``: every rank's random number generators, saved and restored.

Each rank's generators differ (dropout masks must differ across data-parallel
ranks), so the state of every rank is gathered into one list that all ranks
save alike (and is written once). Values are plain bytes, ints and numpy
arrays, so the checkpoint stays pickle-free.

Restoring on the same number of ranks gives each rank its own streams back
exactly. On a different number of ranks, rank ``r`` takes saved rank
``r % saved_ranks``'s streams and then mixes its own rank into them, so ranks
never share a stream; the continuation is then reproducible but cannot match
the original run's random numbers, and a warning says so.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from distcp.distributed import cpu_group
from distcp.errors import CheckpointError

__all__ = ["RNGState"]


class RNGState:
    """A ``Stateful`` over the torch (CPU and every CUDA device), numpy and
    python ``random`` global generators of every rank."""

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": _all_ranks(_capture())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("per_rank")
        if not isinstance(saved, list) or not saved:
            raise CheckpointError(
                "RNGState: the checkpoint holds no per-rank RNG states under 'per_rank'"
            )
        rank, world_size = _rank_and_world()
        _restore(saved[rank % len(saved)])
        if world_size != len(saved):
            warnings.warn(
                f"RNGState: the checkpoint holds RNG states of {len(saved)} ranks and this job "
                f"has {world_size}; rank {rank} continues from saved rank {rank % len(saved)}'s "
                "streams mixed with its own rank, so random numbers differ from the original run",
                stacklevel=2,
            )
            _mix_in_rank(rank)


def _capture() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, saved in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(saved), dtype=torch.uint8), device)


def _mix_in_rank(rank: int) -> None:
    """Derive this rank's streams from the restored ones and its rank."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) ^ (rank * 0x9E3779B97F4A7C15 % 2**62)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ranks(mine: dict[str, Any]) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    world = dist.group.WORLD
    assert world is not None
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine, group=cpu_group(world))
    return gathered
