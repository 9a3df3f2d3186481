"""A synced save starts each data file's writeback as it goes: every byte
range written is handed to ``sync_file_range`` once, in order, before the
final fsync; the checkpoint is the same bit for bit. An unsynced save starts
none."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import distcp
from distcp import knobs
from distcp.filesystem import writeback
from distcp.stores import local as writer


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"w{n}": torch.randn(1 << 20, generator=g) for n in range(10)}  # 10 × 4 MiB


def record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    original = writeback.start_writeback

    def recording(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        original(fd, offset, length)

    monkeypatch.setattr(writer, "start_writeback", recording)
    return calls


def test_a_synced_save_starts_writeback_in_order_and_loads_bit_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record(monkeypatch)
    saved = state()
    fs_writer = distcp.FileSystemWriter(tmp_path, thread_count=1, sync_files=True)
    distcp.save(saved, storage_writer=fs_writer, no_dist=True)
    assert len(calls) >= 2
    position = 0
    for offset, length in calls:  # contiguous from the start, each at least the interval
        assert offset == position and length >= knobs.WRITEBACK_EVERY
        position += length
    (data_file,) = [p for p in tmp_path.iterdir() if p.name.startswith("data-")]
    assert position <= data_file.stat().st_size
    target = {key: torch.zeros_like(value) for key, value in saved.items()}
    distcp.load(target, checkpoint_id=tmp_path, no_dist=True)
    assert all(torch.equal(target[key], saved[key]) for key in saved)


def test_an_unsynced_save_starts_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record(monkeypatch)
    fs_writer = distcp.FileSystemWriter(tmp_path, thread_count=1, sync_files=False)
    distcp.save(state(), storage_writer=fs_writer, no_dist=True)
    assert calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_and_accepts_a_real_file(tmp_path: Path) -> None:
    assert writeback._sync_file_range is not None
    path = tmp_path / "f"
    with open(path, "wb") as file:
        file.write(b"x" * 10000)
        file.flush()
        writeback.start_writeback(file.fileno(), 0, 10000)
        os.fsync(file.fileno())
    assert path.read_bytes() == b"x" * 10000
