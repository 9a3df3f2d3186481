"""CUDA paths: device tensors saved through host copies and loaded back onto the
device, and coordination over a CPU group when the default group is NCCL.
Skipped, visibly, on machines without a GPU."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distcp
from distcp.testing import free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_tensors_round_trip_onto_the_device(tmp_path: Path) -> None:
    saved = {
        "w": torch.randn(64, 32, device="cuda"),
        "h": torch.randn(16, device="cuda").half(),
        "t": torch.randn(8, 8, device="cuda").t(),
    }
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    target = {key: torch.zeros_like(value) for key, value in saved.items()}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    for key, value in saved.items():
        assert target[key].is_cuda and torch.equal(target[key], value), key


def test_cpu_checkpoint_loads_into_cuda_tensors_with_widening(tmp_path: Path) -> None:
    saved = {"w": torch.randn(32, 32).bfloat16()}
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    target = {"w": torch.empty(32, 32, device="cuda")}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert torch.equal(target["w"].cpu(), saved["w"].float())


def test_nccl_default_group_coordinates_over_gloo(tmp_path: Path) -> None:
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
    )
    try:
        before = torch.cuda.memory_allocated()
        saved = {"w": torch.randn(128, 128, device="cuda")}
        distcp.save(saved, checkpoint_id=tmp_path)
        target = {"w": torch.zeros(128, 128, device="cuda")}
        distcp.load(target, checkpoint_id=tmp_path)
        assert torch.equal(target["w"], saved["w"])
        # plan exchange must not have left GPU allocations behind (tensors only)
        assert torch.cuda.memory_allocated() - before <= 2 * 128 * 128 * 4
    finally:
        dist.destroy_process_group()


def test_many_device_tensors_stream_through_pinned_buffers(tmp_path: Path) -> None:
    """Several CUDA items per file (one thread): each is copied to a pinned
    buffer while the previous one is written, buffers alternating and growing."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    saved = {
        f"t{n}": torch.randn(size, device="cuda", generator=generator)
        for n, size in enumerate([5, 4096, 17, 100_000, 3, 65_536])
    }
    saved["view"] = saved["t3"][::3]  # non-contiguous: made contiguous on the device first
    writer = distcp.FileSystemWriter(tmp_path, thread_count=1)
    distcp.save(saved, storage_writer=writer, no_dist=True)
    target = {key: torch.zeros_like(value) for key, value in saved.items()}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    for key, value in saved.items():
        assert torch.equal(target[key], value), key


@pytest.mark.parametrize(
    "kind",
    [distcp.AsyncCheckpointerType.THREAD, distcp.AsyncCheckpointerType.PROCESS],
    ids=["thread", "process"],
)
def test_async_save_snapshots_device_tensors(
    tmp_path: Path, kind: distcp.AsyncCheckpointerType
) -> None:
    """Staged from the device (pinned for the thread, shared memory for the
    writer process), then changed on the device at once: the snapshot holds."""
    from distcp.async_save import staging_buffers

    saved = {"w": torch.randn(256, 64, device="cuda"), "t": torch.randn(8, 8, device="cuda").t()}
    expected = {key: value.clone() for key, value in saved.items()}
    future = distcp.async_save(
        saved, checkpoint_id=tmp_path, no_dist=True, async_checkpointer_type=kind
    )
    for value in saved.values():
        value.zero_()
    future.result(timeout=120)
    buffers = staging_buffers(kind)
    assert buffers is not None and buffers.arena is not None
    assert buffers.arena.memory.is_pinned() == (kind is distcp.AsyncCheckpointerType.THREAD)
    target = {key: torch.zeros_like(value) for key, value in saved.items()}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    for key, value in expected.items():
        assert torch.equal(target[key], value), key
