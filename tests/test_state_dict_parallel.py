"""``distcp.state_dict`` on real gloo ranks: a model and optimizer saved under one
parallelism (FSDP2, FSDP1, DDP, FSDP2 + tensor parallel) load under another (or
in one process) bit for bit, and training resumes as if never interrupted. The
full (gathered) state is also compared with torch DCP's ``get_state_dict``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as torch_dsd
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import distcp
from distcp.state_dict import StateDictOptions, get_state_dict, set_state_dict
from distcp.testing import RankPool
from test_state_dict import (
    MLP,
    adam_groups,
    close,
    local_copy,
    same_state,
    train,
)

PoolFactory = Callable[[int], RankPool]
FULL = StateDictOptions(full_state_dict=True)


# --- models under each parallelism ---------------------------------------------------------


def build(kind: str, world_size: int, seed: int) -> nn.Module:
    model = MLP(seed)
    if kind == "plain":
        return model
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind.startswith("fsdp1"):
        return FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),  # device_id=None asks for an accelerator
            use_orig_params=kind == "fsdp1-orig",
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        )
    if kind == "fsdp2":
        return _fully_shard(model, init_device_mesh("cpu", (world_size,)))
    if kind == "tp":
        return _tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    if kind == "fsdp2+tp":
        mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
        return _fully_shard(_tensor_parallel(model, mesh["tp"]), mesh["dp"])
    raise ValueError(kind)


def _fully_shard(model: MLP, mesh: Any) -> MLP:
    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tensor_parallel(model: MLP, mesh: Any) -> MLP:
    plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)  # type: ignore[return-value]


def optimizer_for(kind: str, model: nn.Module, *, fresh: bool = False) -> Any:
    """The optimizer of a run; ``fresh`` builds the resuming one with its param
    groups in the other order and every hyper-parameter wrong."""
    if kind == "adam":
        return adam_groups(model, reverse=fresh, lr=9.0 if fresh else None)
    if kind == "adamw":
        return adam_groups(model, reverse=fresh, lr=9.0 if fresh else None, adamw=True)
    if kind == "adam-one-group":
        return torch.optim.Adam(model.parameters(), lr=9.0 if fresh else 0.01)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=9.0 if fresh else 0.05, momentum=0.9)
    raise ValueError(kind)


def full_state(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    return local_copy(model_sd), local_copy(optim_sd)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# --- what each rank runs ---------------------------------------------------------------------


def save_run(rank: int, world_size: int, path: str, kind: str, optim: str) -> Any:
    """Train 2 steps, save, then train 3 more: the uninterrupted run."""
    model = build(kind, world_size, seed=0)
    optimizer = optimizer_for(optim, model)
    train(model, optimizer, 2)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    distcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved = full_state(model, optimizer)
    peer = torch_dsd.get_state_dict(
        model, optimizer, options=torch_dsd.StateDictOptions(full_state_dict=True)
    )
    peer_differences = same_state(saved, (local_copy(peer[0]), local_copy(peer[1])))
    train(model, optimizer, 3, first=2)
    after = full_state(model, optimizer)[0]
    return (saved, after, peer_differences) if rank == 0 else None


def resume_run(rank: int, world_size: int, path: str, kind: str, optim: str) -> Any:
    """Load into a differently initialised model and optimizer, then train 3 steps."""
    model = build(kind, world_size, seed=5)
    optimizer = optimizer_for(optim, model, fresh=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    distcp.load(state, checkpoint_id=path, no_dist=not distributed())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    loaded = full_state(model, optimizer)
    train(model, optimizer, 3, first=2)
    after = full_state(model, optimizer)[0]
    return (loaded, after) if rank == 0 else None


def set_from_rank0(rank: int, world_size: int, full: Any, kind: str, optim: str) -> Any:
    """Rank 0 alone holds the full state; every rank ends up with its shard."""
    model = build(kind, world_size, seed=7)
    optimizer = optimizer_for(optim, model, fresh=True)
    model_sd, optim_sd = full if rank == 0 else ({}, {})
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_state_dict(
        model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
    )
    restored = full_state(model, optimizer)  # a collective: every rank gathers
    return restored if rank == 0 else None


def offloaded(rank: int, world_size: int, kind: str, optim: str) -> Any:
    model = build(kind, world_size, seed=0)
    optimizer = optimizer_for(optim, model)
    train(model, optimizer, 1)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return (sorted(model_sd), sorted(optim_sd), full_state(model, optimizer))


# --- the cases -------------------------------------------------------------------------------


WRAPPER_NAMES = ("module", "_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")


def check_resume(saved_run: Any, resumed_run: Any) -> None:
    (saved, after, peer_differences), (loaded, resumed_after) = saved_run, resumed_run
    keys = [*saved[0], *saved[1]["state"]]
    assert not [key for key in keys if set(key.split(".")) & set(WRAPPER_NAMES)]
    assert peer_differences == [], "distcp's full state differs from torch DCP's"
    assert same_state(saved, loaded) == []
    assert close(after, resumed_after) == []


def test_fsdp2_on_4_resumes_on_fsdp2_on_2_and_in_one_process(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    saved = rank_pool(4).run(save_run, str(tmp_path), "fsdp2", "adam")[0]
    check_resume(saved, rank_pool(2).run(resume_run, str(tmp_path), "fsdp2", "adam")[0])
    check_resume(saved, resume_run(0, 1, str(tmp_path), "plain", "adam"))


@pytest.mark.parametrize("kind", ["fsdp1-orig", "fsdp1-flat"])
def test_fsdp1_on_2_resumes_on_fsdp2_on_3(
    rank_pool: PoolFactory, tmp_path: Path, kind: str
) -> None:
    saved = rank_pool(2).run(save_run, str(tmp_path), kind, "adam-one-group")[0]
    resumed = rank_pool(3).run(resume_run, str(tmp_path), "fsdp2", "adam-one-group")[0]
    check_resume(saved, resumed)


def test_ddp_on_2_resumes_on_tensor_parallel_on_2(rank_pool: PoolFactory, tmp_path: Path) -> None:
    saved = rank_pool(2).run(save_run, str(tmp_path), "ddp", "sgd")[0]
    check_resume(saved, rank_pool(2).run(resume_run, str(tmp_path), "tp", "sgd")[0])


def test_fsdp2_with_tensor_parallel_on_4_resumes_on_fsdp2_on_2(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    saved = rank_pool(4).run(save_run, str(tmp_path), "fsdp2+tp", "adam")[0]
    check_resume(saved, rank_pool(2).run(resume_run, str(tmp_path), "fsdp2", "adam")[0])


def test_tensor_parallel_on_2_resumes_on_fsdp1_on_2(rank_pool: PoolFactory, tmp_path: Path) -> None:
    saved = rank_pool(2).run(save_run, str(tmp_path), "tp", "adamw")[0]
    check_resume(saved, rank_pool(2).run(resume_run, str(tmp_path), "fsdp1-orig", "adamw")[0])


@pytest.mark.parametrize(
    ("kind", "world_size"), [("fsdp2", 2), ("fsdp1-orig", 2), ("tp", 2), ("fsdp2+tp", 4)]
)
def test_full_state_dicts_offload_to_rank_0_and_broadcast_from_it(
    rank_pool: PoolFactory, kind: str, world_size: int
) -> None:
    pool = rank_pool(world_size)
    results = pool.run(offloaded, kind, "adam")
    full = results[0][2]
    assert results[0][:2] == (sorted(full[0]), ["param_groups", "state"])
    assert all(result[:2] == ([], []) for result in results[1:])
    restored = pool.run(set_from_rank0, full, kind, "adam")[0]
    assert same_state(full, restored) == []
