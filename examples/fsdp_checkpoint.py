"""Saving and loading an FSDP model with distcp: PyTorch's "Getting Started with
Distributed Checkpoint (DCP)" tutorial, ported by changing its imports.

    python examples/fsdp_checkpoint.py [--world-size 2] [--dir DIR]

As in the tutorial, an ``AppState`` (a ``Stateful``) wraps the model and the
optimizer: ``dcp.save`` calls its ``state_dict()``, which asks
``get_state_dict`` for their sharded state under clean parameter names, and
``dcp.load`` fills that state in place and hands it to ``load_state_dict()``,
which applies it with ``set_state_dict``. The only changes for distcp are the
imports (``import distcp as dcp``, ``from distcp.state_dict import ...``) and
the CPU: gloo instead of NCCL, ``fully_shard`` on a CPU device mesh.

The ranks first train one step and save; a second group of ranks then builds
a fresh model and optimizer, loads the checkpoint into them, and checks that
it got the first group's weights back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import distcp as dcp
from distcp import Stateful
from distcp.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)


class AppState(Stateful):
    """The application state to checkpoint: here a model and its optimizer.

    ``dcp.save`` / ``dcp.load`` call ``state_dict()`` / ``load_state_dict()``
    automatically, so the state dict is created (and applied) exactly when
    the checkpoint needs it.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        # FQNs as keys, FSDP's sharded DTensors as values: each rank saves its own shards.
        model_state_dict, optimizer_state_dict = get_state_dict(self.model, self.optimizer)
        return {"model": model_state_dict, "optim": optimizer_state_dict}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Puts the loaded shards into the model and the optimizer.
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
        )


class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net1 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))  # type: ignore[no-any-return]


def setup(rank: int, world_size: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def cleanup() -> None:
    dist.barrier()  # leave together
    dist.destroy_process_group()
    # torch 2.13's C++ teardown at interpreter exit sometimes aborts a CPU/gloo
    # FSDP2 process ("terminate called without an active exception"), torch
    # DCP or not; the work is done, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = ToyModel()
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state, on rank 0 (``{}`` elsewhere)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def run_fsdp_checkpoint_save_example(rank: int, world_size: int, port: int, path: str) -> None:
    setup(rank, world_size, port)
    model, optimizer = build(seed=0)
    optimizer.zero_grad()
    model(torch.rand(8, 16)).sum().backward()
    optimizer.step()

    state_dict = {"app": AppState(model, optimizer)}
    dcp.save(state_dict, checkpoint_id=path)
    saved = full_weights(model)
    if rank == 0:
        torch.save(saved, Path(path).parent / "expected.pt")
        print(f"rank 0: saved the model and optimizer of {world_size} ranks to {path}")
    cleanup()


def run_fsdp_checkpoint_load_example(rank: int, world_size: int, port: int, path: str) -> None:
    setup(rank, world_size, port)
    model, optimizer = build(seed=1)  # other weights: the load must replace them

    # get_state_dict gives placeholders in this job's layout; dcp.load fills them in
    # place, then calls AppState.load_state_dict to apply them.
    state_dict = {"app": AppState(model, optimizer)}
    dcp.load(state_dict=state_dict, checkpoint_id=path)
    loaded = full_weights(model)
    if rank == 0:
        expected = torch.load(Path(path).parent / "expected.pt", weights_only=True)
        if expected.keys() != loaded.keys() or not all(
            torch.equal(expected[key], loaded[key]) for key in expected
        ):
            raise RuntimeError("the loaded weights differ from the saved ones")
        print(f"rank 0: loaded it on {world_size} ranks; the weights are the saved ones")
    cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoint here")
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="distcp-fsdp-"))
    checkpoint = str(workdir / "checkpoint")
    world_size = args.world_size
    print(f"Running the FSDP checkpoint example on {world_size} ranks.")
    for example in (run_fsdp_checkpoint_save_example, run_fsdp_checkpoint_load_example):
        mp.spawn(  # type: ignore[attr-defined,no-untyped-call]
            example, args=(world_size, free_port(), checkpoint), nprocs=world_size, join=True
        )
    if args.dir is None:
        shutil.rmtree(workdir)
