"""Shared fixtures: pools of gloo ranks reused across the whole session."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from distcp.testing import RankPool

torch.set_num_threads(1)

_pools: dict[int, RankPool] = {}


def _pool(world_size: int) -> RankPool:
    pool = _pools.get(world_size)
    if pool is None or pool.broken:
        pool = _pools[world_size] = RankPool(world_size)
    return pool


@pytest.fixture(scope="session")
def rank_pool() -> Iterator[Callable[[int], RankPool]]:
    """``rank_pool(n)``: a pool of n gloo ranks, started once per session."""
    yield _pool
    for pool in _pools.values():
        pool.close()
    _pools.clear()
