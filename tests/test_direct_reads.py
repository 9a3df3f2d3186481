"""The direct read path: a contiguous run of a chunk covering whole checksum
blocks, landing in a contiguous tensor of the saved dtype, is ``pread`` straight
into the destination in pieces smaller than a block, and each block's crc is
extended piece by piece. These tests pin which regions take that path, that the
bytes land exactly, and that a flipped bit anywhere in a block read that way is
caught at that block, whether the block spans several pieces or a piece holds
several blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distcp
from distcp import (
    CorruptCheckpointError,
    DefaultLoadPlanner,
    FileSystemReader,
    FileSystemWriter,
    LoadItemType,
    LoadPlan,
    MetadataIndex,
    ReadItem,
    knobs,
)
from distcp.filesystem import file_mappings

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
ROWS, COLS = 1000, 1024  # 4 KiB rows; the tensor ends inside a block of either size
BLOCK = 64 << 10  # several blocks per direct piece
WEIGHT = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(3))


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


@pytest.fixture(scope="module", params=[None, BLOCK], ids=["block-1MiB", "block-64KiB"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("direct")
    options = {} if request.param is None else {"checksum_block_size": request.param}
    writer = FileSystemWriter(path, sync_files=False, **options)
    distcp.save({"w": WEIGHT}, storage_writer=writer, no_dist=True)
    return path


@pytest.fixture()
def direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Byte counts of every ``pread`` into a destination during the test."""
    calls: list[int] = []
    original = file_mappings.OpenFile.read_into

    def counting(self: file_mappings.OpenFile, buffer: memoryview, offset: int) -> None:
        calls.append(len(buffer))
        original(self, buffer, offset)

    monkeypatch.setattr(file_mappings.OpenFile, "read_into", counting)
    return calls


class RowsPlanner(DefaultLoadPlanner):
    """Loads rows ``[first, end)`` of ``w`` into a tensor of ``dtype``."""

    def __init__(self, first: int, end: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.rows = (first, end)
        self.dest = torch.zeros(end - first, COLS, dtype=dtype)

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex("w", (0, 0))
        item = ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=index,
            dest_offsets=torch.Size([0, 0]),
            storage_index=index,
            storage_offsets=torch.Size([self.rows[0], 0]),
            lengths=torch.Size(list(self.dest.shape)),
        )
        return LoadPlan([item])

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.dest


def load_rows(path: Path, first: int, end: int, dtype: torch.dtype = torch.float32) -> Any:
    planner = RowsPlanner(first, end, dtype)
    reader = FileSystemReader(path)
    distcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    return planner.dest, reader.report


def test_a_whole_tensor_is_read_straight_into_place(
    checkpoint: Path, direct_reads: list[int]
) -> None:
    target = {"w": torch.zeros(ROWS, COLS)}
    reader = FileSystemReader(checkpoint)
    distcp.load(target, storage_reader=reader, no_dist=True)
    assert raw(target["w"]) == raw(WEIGHT)
    size = WEIGHT.numel() * 4
    assert sum(direct_reads) == size
    assert max(direct_reads) == knobs.DIRECT_READ_SIZE
    assert reader.report.bytes_read == reader.report.bytes_verified == size


@pytest.mark.parametrize(("first", "end"), [(256, 512), (256, ROWS), (512, 768)])
def test_rows_covering_whole_blocks_are_read_directly(
    checkpoint: Path, direct_reads: list[int], first: int, end: int
) -> None:
    """Rows starting on a block boundary and ending on one, or at the chunk's
    end (its last block is short and read whole)."""
    dest, report = load_rows(checkpoint, first, end)
    assert raw(dest) == raw(WEIGHT[first:end])
    assert sum(direct_reads) == (end - first) * COLS * 4
    assert report.bytes_read == report.bytes_verified == report.bytes_needed


@pytest.mark.parametrize(("first", "end"), [(0, 300), (5, 400), (300, ROWS)])
def test_rows_splitting_a_block_take_the_mapped_path(
    checkpoint: Path, direct_reads: list[int], first: int, end: int
) -> None:
    """A block the region needs only part of is read whole to verify it, so
    the region goes through the mapping instead."""
    dest, report = load_rows(checkpoint, first, end)
    assert raw(dest) == raw(WEIGHT[first:end])
    assert direct_reads == []
    assert report.bytes_verified == report.bytes_needed == (end - first) * COLS * 4
    assert report.bytes_read > report.bytes_needed


def test_without_verification_any_run_of_rows_is_read_directly(
    checkpoint: Path, direct_reads: list[int]
) -> None:
    planner = RowsPlanner(5, 400)
    reader = FileSystemReader(checkpoint, verify_checksums=False)
    distcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    assert raw(planner.dest) == raw(WEIGHT[5:400])
    assert sum(direct_reads) == reader.report.bytes_read == 395 * COLS * 4
    assert reader.report.bytes_verified == 0


def test_a_cast_takes_the_mapped_path(checkpoint: Path, direct_reads: list[int]) -> None:
    dest, _ = load_rows(checkpoint, 0, ROWS, torch.float64)
    assert torch.equal(dest, WEIGHT.double())
    assert direct_reads == []


@SETTINGS
@given(data=st.data())
def test_a_flip_in_any_block_read_directly_is_caught_at_that_block(
    checkpoint: Path, data: Any
) -> None:
    info = FileSystemReader(checkpoint).read_metadata().storage_data[MetadataIndex("w", (0, 0))]
    relative = data.draw(st.integers(0, info.length - 1), label="byte in the tensor")
    bit = data.draw(st.integers(0, 7), label="bit")
    file = checkpoint / info.relative_path
    position = info.offset + relative
    block_offset = info.offset + relative // info.checksum_block_size * info.checksum_block_size
    original = file.read_bytes()
    damaged = bytearray(original)
    damaged[position] ^= 1 << bit
    file.write_bytes(bytes(damaged))
    try:
        with pytest.raises(CorruptCheckpointError) as caught:
            distcp.load({"w": torch.zeros(ROWS, COLS)}, checkpoint_id=checkpoint, no_dist=True)
        assert caught.value.file == str(file)
        assert caught.value.offset == block_offset
        assert f"byte offset {block_offset} " in str(caught.value)
    finally:
        file.write_bytes(original)
