"""Plan caching: a repeated save of the same structure skips global planning.

A training job saves the same structure every N steps. With
``DefaultSavePlanner(enable_plan_caching=True)`` the coordinator keeps the
global plans and metadata it built from the last set of local plans; when
every rank's local plan is the same again (compared by a digest of its
pickled form), it reuses them and only the storage layer's per-save part (a
new save id) is redone. Any change (a tensor added, a shape, dtype or sharding
changed, another rank count) changes a digest and plans are built afresh.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from dataclasses import dataclass

from distcp.metadata import Metadata
from distcp.planner import SavePlan

__all__ = ["PlanCache", "plan_digest"]


def plan_digest(plans: list[SavePlan]) -> bytes:
    """A digest of the local plans of every rank, in rank order."""
    return hashlib.blake2b(pickle.dumps(plans, protocol=5), digest_size=32).digest()


@dataclass
class _Entry:
    digest: bytes
    global_plans: list[SavePlan]
    metadata: Metadata


class PlanCache:
    """The coordinator's last global planning result, per cache key."""

    def __init__(self) -> None:
        self._entries: dict[object, _Entry] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, key: object, digest: bytes) -> tuple[list[SavePlan], Metadata] | None:
        entry = self._entries.get(key)
        if entry is None or entry.digest != digest:
            self.misses += 1
            return None
        self.hits += 1
        # The commit fills in the metadata's storage data: give each save its own copy.
        return entry.global_plans, copy.copy(entry.metadata)

    def store(
        self, key: object, digest: bytes, global_plans: list[SavePlan], metadata: Metadata
    ) -> None:
        self._entries[key] = _Entry(digest, global_plans, copy.copy(metadata))


#: The process's cache (only the coordinator's entries are ever used).
PLAN_CACHE = PlanCache()
