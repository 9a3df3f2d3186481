"""distcp demo: save a sharded state on N ranks, resume it on M ranks with a
different sharding, and check that every byte came back.

    python examples/demo.py [--save-ranks 4] [--load-ranks 2] [--dir DIR]

Each rank is a real process joined over gloo (CPU). On save, the model's
weights are DTensors sharded by rows (``Shard(0)``) across the N ranks, next
to replicated biases, an optimizer-like state, a step counter and RNG state.
On load, the M ranks ask for the same tensors sharded by columns
(``Shard(1)``): each rank reads only the pieces of the saved row-shards it
needs. Every rank then compares its shards with the expected bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Shard, distribute_tensor

import distcp

LAYERS = 8
WIDTH = 512


def full_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference tensors every rank can regenerate to check its shards."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        state[f"layers.{layer}.weight"] = torch.randn(WIDTH, WIDTH, generator=generator)
        state[f"layers.{layer}.bias"] = torch.randn(WIDTH, generator=generator)
        state[f"optim.{layer}.exp_avg"] = torch.randn(WIDTH, WIDTH, generator=generator)
    state["embedding"] = torch.randn(1000, WIDTH, generator=generator).to(torch.bfloat16)
    return state


def sharded_state(world_size: int, placement: Placement, *, zeros: bool) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    state: dict[str, Any] = {"model": {}, "optim": {}, "app": {"step": 0, "tokens_seen": 0}}
    for key, tensor in full_state().items():
        source = torch.zeros_like(tensor) if zeros else tensor
        if key.endswith("bias"):
            value: Any = source.clone()  # replicated: the same plain tensor on every rank
        else:
            value = distribute_tensor(source, mesh, [placement])
        section, name = ("optim", key[6:]) if key.startswith("optim.") else ("model", key)
        state[section][name] = value
    return state


def save_worker(rank: int, world_size: int, port: int, path: str, out: Any) -> None:
    _join(rank, world_size, port)
    state = sharded_state(world_size, Shard(0), zeros=False)
    state["app"] = {"step": 1000, "tokens_seen": 2**40, "rng": torch.get_rng_state()}
    dist.barrier()
    start = time.perf_counter()
    distcp.save(state, checkpoint_id=path)
    dist.barrier()
    out.put(("save", rank, time.perf_counter() - start))
    dist.destroy_process_group()


def load_worker(rank: int, world_size: int, port: int, path: str, out: Any) -> None:
    _join(rank, world_size, port)
    state = sharded_state(world_size, Shard(1), zeros=True)
    reader = distcp.FileSystemReader(path)
    dist.barrier()
    start = time.perf_counter()
    distcp.load(state, storage_reader=reader)
    dist.barrier()
    elapsed = time.perf_counter() - start
    expected = full_state()
    mismatches = []
    for section in ("model", "optim"):
        for name, value in state[section].items():
            key = name if section == "model" else f"optim.{name}"
            if isinstance(value, DTensor):
                local, reference = value.to_local(), _local_piece(expected[key], value)
            else:
                local, reference = value, expected[key]
            if not torch.equal(local.view(torch.uint8), reference.contiguous().view(torch.uint8)):
                mismatches.append(key)
    if state["app"]["step"] != 1000 or state["app"]["tokens_seen"] != 2**40:
        mismatches.append("app")
    out.put(
        ("load", rank, elapsed, mismatches, reader.report.bytes_read, reader.report.bytes_needed)
    )
    dist.destroy_process_group()


def _local_piece(full: torch.Tensor, value: DTensor) -> torch.Tensor:
    """The part of ``full`` a Shard(1) DTensor holds on this rank."""
    pieces = torch.chunk(full, value.device_mesh.size(), dim=1)
    return pieces[value.device_mesh.get_coordinate()[0]]  # type: ignore[index]


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run(worker: Any, world_size: int, path: str) -> list[tuple[Any, ...]]:
    context = mp.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=worker, args=(r, world_size, port, path, out))
        for r in range(world_size)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=300) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"a rank exited with code {process.exitcode}")
    return sorted(results, key=lambda r: r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save-ranks", type=int, default=4)
    parser.add_argument("--load-ranks", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoint directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="distcp-demo-"))
    path = args.dir or workdir / "checkpoint"

    print(f"saving on {args.save_ranks} ranks (weights Shard(0), biases replicated) -> {path}")
    saves = _run(save_worker, args.save_ranks, str(path))
    files = [p for p in Path(path).iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    save_time = max(r[2] for r in saves)
    print(f"resuming on {args.load_ranks} ranks with weights Shard(1)")
    loads = _run(load_worker, args.load_ranks, str(path))
    load_time = max(r[2] for r in loads)
    mismatches = sorted({key for r in loads for key in r[3]})
    bytes_read, bytes_needed = sum(r[4] for r in loads), sum(r[5] for r in loads)

    mib = size / 2**20
    print()
    print(f"checkpoint      {mib:.1f} MiB in {len(files)} files")
    save_rate, load_rate = mib / save_time, mib / load_time
    print(f"save            {save_time:.2f} s  ({save_rate:.0f} MiB/s) on {args.save_ranks} ranks")
    print(f"load            {load_time:.2f} s  ({load_rate:.0f} MiB/s) on {args.load_ranks} ranks")
    print(f"bytes read      {bytes_read / bytes_needed:.2f} x the bytes needed")
    if mismatches:
        print(f"verification    FAILED: {', '.join(mismatches)}")
        raise SystemExit(1)
    print("verification    every tensor and value bit-exact after resharding")
    if args.dir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
