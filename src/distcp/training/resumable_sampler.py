"""``ResumableSampler``: a distributed sampler whose position survives a
checkpoint, even onto a different number of ranks.

The position is global: how many samples of this epoch's order all ranks
together have consumed. Each epoch's order is a permutation fixed by
``(seed, epoch)``; rank ``r`` of ``n`` takes every ``n``-th index of what is
left, starting at ``r``. So a job that stopped after ``k`` samples resumes at
sample ``k`` of the same order on any number of ranks, and no sample is
skipped or repeated (up to the final partial round, as ``DistributedSampler``
with ``drop_last=True``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields this rank's dataset indices for the current epoch, from the
    current position.

    The training loop says what it consumed: call :meth:`advance` with the
    global number of samples of each step (``batch_size × world_size``), or let
    the sampler count what it yielded (exact with ``num_workers=0``; with
    worker processes the loader prefetches, so prefer :meth:`advance`).
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        count_yielded: bool = False,
    ) -> None:
        if dataset_size < 0:
            raise ValueError(f"dataset_size must be non-negative, got {dataset_size}")
        initialised = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas or (dist.get_world_size() if initialised else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in 0..{self.num_replicas - 1}")
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.count_yielded = count_yielded
        self.epoch = 0
        self.position = 0  # samples of this epoch's order consumed by all ranks

    def order(self) -> list[int]:
        """This epoch's order of the whole dataset (the same on every rank)."""
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        remaining = self.order()[self.position :]
        usable = len(remaining) - len(remaining) % self.num_replicas
        for index in remaining[self.rank : usable : self.num_replicas]:
            if self.count_yielded:
                self.position += self.num_replicas
            yield index

    def __len__(self) -> int:
        return (self.dataset_size - self.position) // self.num_replicas

    def advance(self, samples: int) -> None:
        """Record that all ranks together consumed ``samples`` more samples."""
        self.position += samples

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["dataset_size"] != self.dataset_size:
            raise ValueError(
                f"ResumableSampler: the checkpoint's dataset has {state_dict['dataset_size']} "
                f"samples but this one has {self.dataset_size}"
            )
        self.epoch = int(state_dict["epoch"])
        self.position = int(state_dict["position"])
        self.seed = int(state_dict["seed"])
        self.shuffle = bool(state_dict["shuffle"])
