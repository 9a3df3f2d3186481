"""The whole training state in one Stateful: RNG streams of every rank, a data
position that survives a change of world size, and model + optimizer + step
continuing exactly where they stopped."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import distcp
from distcp.testing import RankPool
from distcp.training import ResumableSampler, RNGState, TrainingState

PoolFactory = Callable[[int], RankPool]


def draws() -> tuple[list[float], list[float], list[float]]:
    return (
        torch.rand(4).tolist(),
        np.random.rand(4).tolist(),
        [random.random() for _ in range(4)],
    )


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    draws()  # move away from the seeds
    distcp.save({"rng": RNGState()}, checkpoint_id=tmp_path, no_dist=True)
    expected = draws()
    draws()
    distcp.load({"rng": RNGState()}, checkpoint_id=tmp_path, no_dist=True)
    assert draws() == expected


def rng_save(rank: int, world_size: int, path: str) -> list[float]:
    torch.manual_seed(100 + rank)
    np.random.seed(200 + rank)
    random.seed(300 + rank)
    distcp.save({"rng": RNGState()}, checkpoint_id=path)
    return torch.rand(3).tolist()


def rng_load(rank: int, world_size: int, path: str) -> tuple[list[float], bool]:
    torch.manual_seed(0)
    with pytest.warns(UserWarning) if world_size != 2 else _no_warning():
        distcp.load({"rng": RNGState()}, checkpoint_id=path)
    return torch.rand(3).tolist(), world_size != 2


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


def test_every_rank_gets_its_own_streams_back(tmp_path: Path, rank_pool: PoolFactory) -> None:
    path = str(tmp_path / "ckpt")
    saved = rank_pool(2).run(rng_save, path)
    assert saved[0] != saved[1]  # the ranks' streams differ
    same_world = [draws for draws, _ in rank_pool(2).run(rng_load, path)]
    assert same_world == saved
    other_world = [draws for draws, _ in rank_pool(3).run(rng_load, path)]
    assert len({tuple(d) for d in other_world}) == 3  # no two ranks share a stream
    again = [draws for draws, _ in rank_pool(3).run(rng_load, path)]
    assert again == other_world  # and the continuation is reproducible


# --- ResumableSampler


def consume(sampler: ResumableSampler, samples_per_rank: int) -> list[int]:
    taken = []
    for index in sampler:
        taken.append(index)
        if len(taken) == samples_per_rank:
            break
    return taken


def test_sampler_resumes_on_another_world_size_without_gaps_or_repeats(tmp_path: Path) -> None:
    size = 103
    before = [ResumableSampler(size, num_replicas=2, rank=r, seed=7) for r in range(2)]
    seen = [i for sampler in before for i in consume(sampler, 20)]
    for sampler in before:
        sampler.advance(2 * 20)
    distcp.save({"sampler": before[0]}, checkpoint_id=tmp_path, no_dist=True)
    after = [ResumableSampler(size, num_replicas=3, rank=r, seed=0) for r in range(3)]
    for sampler in after:
        distcp.load({"sampler": sampler}, checkpoint_id=tmp_path, no_dist=True)
        assert sampler.position == 40 and sampler.seed == 7
        seen += list(sampler)
    order = before[0].order()
    assert len(seen) == len(set(seen))  # nothing repeated
    usable = 40 + (size - 40) // 3 * 3
    assert sorted(seen) == sorted(order[:usable])  # nothing skipped but the last partial round


def test_sampler_refuses_a_different_dataset(tmp_path: Path) -> None:
    distcp.save(
        {"s": ResumableSampler(10, num_replicas=1, rank=0)}, checkpoint_id=tmp_path, no_dist=True
    )
    with pytest.raises(ValueError, match="checkpoint's dataset has 10 samples but this one has 11"):
        distcp.load(
            {"s": ResumableSampler(11, num_replicas=1, rank=0)},
            checkpoint_id=tmp_path,
            no_dist=True,
        )


def test_sampler_counting_what_it_yields() -> None:
    sampler = ResumableSampler(10, num_replicas=2, rank=1, shuffle=False, count_yielded=True)
    assert consume(sampler, 3) == [1, 3, 5]
    assert sampler.position == 6 and len(sampler) == 2


# --- TrainingState: train, save, continue == train without stopping


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # type: ignore[no-any-return]


DATA = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
TARGET = DATA.sum(1, keepdim=True)


def train(state: TrainingState, sampler: ResumableSampler, steps: int) -> list[float]:
    """Steps of batch 4 drawn from the sampler, with dropout and a noisy input
    from numpy and random, so every generator matters."""
    model, optimizer = state.model, state.optimizers
    assert isinstance(optimizer, torch.optim.Optimizer)
    losses = []
    indices = iter(sampler)
    for _ in range(steps):
        batch = torch.tensor([next(indices) for _ in range(4)])
        noise = float(np.random.rand()) * 0.01 + random.random() * 0.01
        loss = ((model(DATA[batch] + noise) - TARGET[batch]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sampler.advance(4)
        state.step += 1
        losses.append(loss.item())
    return losses


def fresh(seed: int) -> tuple[TrainingState, ResumableSampler]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ResumableSampler(len(DATA), num_replicas=1, rank=0, seed=5)
    return TrainingState(model, optimizer, extras={"sampler": sampler}), sampler


def test_training_continues_exactly_after_a_reload(tmp_path: Path) -> None:
    state, sampler = fresh(0)
    np.random.seed(1)
    random.seed(1)
    train(state, sampler, 3)
    distcp.save({"app": state}, checkpoint_id=tmp_path, no_dist=True)
    uninterrupted = train(state, sampler, 4)
    final = {k: v.clone() for k, v in state.model.state_dict().items()}

    resumed, resumed_sampler = fresh(99)  # other weights, other RNG
    np.random.seed(12345)
    random.seed(12345)
    distcp.load({"app": resumed}, checkpoint_id=tmp_path, no_dist=True)
    assert resumed.step == 3 and resumed_sampler.position == 12
    assert train(resumed, resumed_sampler, 4) == uninterrupted
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert resumed.step == 7


def test_extras_must_be_stateful() -> None:
    model = Net()
    with pytest.raises(distcp.CheckpointError, match=r"extra .loader. .* has no state_dict"):
        TrainingState(
            model, torch.optim.SGD(model.parameters(), lr=0.1), extras={"loader": object()}
        )  # type: ignore[dict-item]
