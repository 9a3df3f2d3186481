"""Reading only the bytes needed, with every byte still verified.

A resharding load (rows saved, columns loaded) splits checksum blocks between
ranks. Each rank reads only its part and sends the block's masked crc; the
ranks combine them (crc32c is affine) and check the stored checksum. These
tests check the algebra, the planning of who contributes, that such loads read
exactly the bytes needed, and that corruption anywhere in a split block is
caught on every rank with the file and offset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Placement, Replicate, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.errors import CorruptCheckpointError
from distcp.filesystem.block_verification import (
    VerificationPlan,
    combine_masked_crcs,
    plan_block_verification,
)
from distcp.metadata import Metadata, MetadataIndex
from distcp.planner import LoadItemType, LoadPlan, ReadItem
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
BLOCK = 256  # small checksum blocks, so small tensors have many split blocks


# --- the algebra


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_masked_crcs_of_disjoint_pieces_combine_to_the_block_crc(data: Any) -> None:
    block = data.draw(st.binary(min_size=1, max_size=300), label="block")
    pieces = data.draw(st.integers(1, 5), label="pieces")
    owner = data.draw(
        st.lists(st.integers(0, pieces - 1), min_size=len(block), max_size=len(block)),
        label="owner of each byte",
    )
    masked = [
        crc32c.crc32c(bytes(b if o == p else 0 for b, o in zip(block, owner, strict=True)))
        for p in range(pieces)
    ]
    assert combine_masked_crcs(masked, len(block)) == crc32c.crc32c(block)
    # A wrong byte in any piece changes the combined value (crc catches any 1-bit error).
    position = data.draw(st.integers(0, len(block) - 1), label="flipped byte")
    bad = bytearray(block)
    bad[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    damaged = [
        crc32c.crc32c(bytes(b if o == p else 0 for b, o in zip(bad, owner, strict=True)))
        for p in range(pieces)
    ]
    assert combine_masked_crcs(damaged, len(block)) != crc32c.crc32c(block)


# --- who contributes


@pytest.fixture(scope="module")
def saved_metadata(tmp_path_factory: pytest.TempPathFactory) -> Metadata:
    path = tmp_path_factory.mktemp("plan")
    distcp.save({"w": torch.zeros(8, 6)}, checkpoint_id=path, no_dist=True)
    return distcp.FileSystemReader(path).read_metadata()


def read_plan(*regions: tuple[tuple[int, int], tuple[int, int]]) -> LoadPlan:
    """A rank's plan reading ``(offsets, lengths)`` regions of chunk ``w``."""
    index = MetadataIndex("w", (0, 0))
    return LoadPlan(
        [
            ReadItem(
                type=LoadItemType.TENSOR,
                dest_index=index,
                dest_offsets=torch.Size([0, 0]),
                storage_index=index,
                storage_offsets=torch.Size(offsets),
                lengths=torch.Size(lengths),
            )
            for offsets, lengths in regions
        ]
    )


W = MetadataIndex("w", (0, 0))
LEFT = ((0, 0), (8, 3))
RIGHT = ((0, 3), (8, 3))


def test_a_column_split_is_cooperative(saved_metadata: Metadata) -> None:
    plans = plan_block_verification([read_plan(LEFT), read_plan(RIGHT)], saved_metadata)
    assert plans == [
        VerificationPlan(frozenset({W}), frozenset({(W, (0, 0))})),
        VerificationPlan(frozenset({W}), frozenset({(W, (0, 3))})),
    ]


def test_replicated_regions_are_contributed_by_their_lowest_rank(
    saved_metadata: Metadata,
) -> None:
    plans = plan_block_verification(
        [read_plan(RIGHT), read_plan(LEFT), read_plan(RIGHT), read_plan(LEFT)], saved_metadata
    )
    assert [plan.contributes for plan in plans] == [
        frozenset({(W, (0, 3))}),
        frozenset({(W, (0, 0))}),
        frozenset(),
        frozenset(),
    ]
    assert all(plan.cooperative == {W} for plan in plans)


@pytest.mark.parametrize(
    "regions",
    [
        [[LEFT]],  # nobody reads the right half
        [[LEFT], [((0, 2), (8, 4))]],  # overlapping distinct regions
        [[LEFT], [((0, 2), (4, 4))]],  # overlapping, with as many elements as the chunk
    ],
    ids=["partial", "overlap", "overlap-same-count"],
)
def test_other_reads_are_not_cooperative(saved_metadata: Metadata, regions: list[Any]) -> None:
    plans = plan_block_verification([read_plan(*mine) for mine in regions], saved_metadata)
    assert all(plan.cooperative == frozenset() for plan in plans)
    assert all(plan.contributes == frozenset() for plan in plans)


# --- real loads on several ranks


def placed(full: torch.Tensor, mesh_shape: tuple[int, ...], placements: list[Placement]) -> Any:
    mesh = init_device_mesh("cpu", mesh_shape)
    return distribute_tensor(full, mesh, placements, src_data_rank=None)


TENSORS = {
    "rows-short": ((64, 48), torch.float32),  # rows shorter than a block
    "rows-long": ((6, 300), torch.bfloat16),  # rows longer than a block
    "cube": ((5, 6, 22), torch.float64),
}


def save_row_sharded(rank: int, world: int, path: str) -> None:
    state = {
        key: placed(random_tensor(shape, dtype, seed), (world,), [Shard(0)])
        for seed, (key, (shape, dtype)) in enumerate(TENSORS.items())
    }
    writer = distcp.FileSystemWriter(path, checksum_block_size=BLOCK)
    distcp.save(state, storage_writer=writer)


def load_resharded(
    rank: int, world: int, path: str, mesh_shape: tuple[int, ...], placements: list[Placement]
) -> dict[str, Any]:
    """Load into ``placements`` (sharding the last dim); return the outcome."""
    state = {
        key: placed(torch.zeros(shape, dtype=dtype), mesh_shape, placements)
        for key, (shape, dtype) in TENSORS.items()
    }
    reader = distcp.FileSystemReader(path)
    try:
        distcp.load(state, storage_reader=reader)
    except CorruptCheckpointError as error:
        return {"error": (type(error).__name__, error.file, error.offset, str(error))}
    exact = all(
        raw(state[key].to_local())
        == raw(placed(random_tensor(shape, dtype, seed), mesh_shape, placements).to_local())
        for seed, (key, (shape, dtype)) in enumerate(TENSORS.items())
    )
    report = reader.report
    return {
        "exact": exact,
        "needed": report.bytes_needed,
        "read": report.bytes_read,
        "verified": report.bytes_verified,
        "split": report.split_blocks,
    }


COLUMNS = [Shard(-1)]


@pytest.fixture(scope="module")
def row_sharded(tmp_path_factory: pytest.TempPathFactory, rank_pool: PoolFactory) -> Path:
    path = tmp_path_factory.mktemp("rows") / "checkpoint"
    rank_pool(2).run(save_row_sharded, str(path))
    return path


def test_column_load_reads_exactly_the_needed_bytes_and_verifies_them(
    row_sharded: Path, rank_pool: PoolFactory
) -> None:
    results = rank_pool(2).run(load_resharded, str(row_sharded), (2,), COLUMNS)
    for rank, result in enumerate(results):
        assert result["exact"], f"rank {rank}: wrong bytes"
        assert result["read"] == result["needed"] > 0, f"rank {rank}: {result}"
        assert result["verified"] == result["needed"], f"rank {rank}: {result}"
        assert result["split"] > 0, f"rank {rank}: no block was split: {result}"


def test_replicated_readers_verify_without_false_alarms(
    row_sharded: Path, rank_pool: PoolFactory
) -> None:
    """HSDP-style target: ranks 0/2 and 1/3 read the same columns; only the
    lower of each pair contributes masked crcs."""
    results = rank_pool(4).run(load_resharded, str(row_sharded), (2, 2), [Replicate(), Shard(-1)])
    for rank, result in enumerate(results):
        assert result["exact"] and result["read"] == result["needed"], f"rank {rank}: {result}"
        assert result["verified"] == result["needed"], f"rank {rank}: {result}"


def test_same_layout_load_needs_no_joint_verification(
    row_sharded: Path, rank_pool: PoolFactory
) -> None:
    results = rank_pool(2).run(load_resharded, str(row_sharded), (2,), [Shard(0)])
    for rank, result in enumerate(results):
        assert result["exact"] and result["read"] == result["needed"], f"rank {rank}: {result}"
        assert result["verified"] == result["needed"] and result["split"] == 0, result


def chunk_bytes(path: Path, key: str) -> list[tuple[Path, int, int, int]]:
    """``(file, offset, length, block size)`` of each saved chunk of ``key``."""
    metadata = distcp.FileSystemReader(path).read_metadata()
    return [
        (path / info.relative_path, info.offset, info.length, info.checksum_block_size)
        for index, info in metadata.storage_data.items()
        if index.fqn == key
    ]


@pytest.mark.parametrize(
    ("key", "where"),
    [("rows-short", 0.9), ("rows-long", 0.3), ("cube", 0.55)],
)
def test_a_flipped_bit_in_a_split_block_fails_every_rank_alike(
    row_sharded: Path, rank_pool: PoolFactory, key: str, where: float
) -> None:
    file, offset, length, block = chunk_bytes(row_sharded, key)[1]
    position = offset + int(length * where)
    original = file.read_bytes()
    damaged = bytearray(original)
    damaged[position] ^= 0x10
    file.write_bytes(bytes(damaged))
    try:
        results = rank_pool(2).run(load_resharded, str(row_sharded), (2,), COLUMNS)
    finally:
        file.write_bytes(original)
    expected_offset = offset + (position - offset) // block * block
    errors = [result.get("error") for result in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    name, error_file, error_offset, message = errors[0]
    assert (name, error_file, error_offset) == (
        "CorruptCheckpointError",
        str(file),
        expected_offset,
    )
    assert repr(key) in message


class TwoRegionPlanner(distcp.DefaultLoadPlanner):
    """Loads chunk ``w`` of an (8, 6) tensor as two local pieces (left and
    right halves), as a rank holding two shards of one saved chunk would."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces = [torch.zeros(8, 3), torch.zeros(8, 3)]

    def create_local_plan(self) -> LoadPlan:
        return read_plan(LEFT, RIGHT)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.pieces[read_item.storage_offsets[1] // 3]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


def test_a_chunk_several_local_pieces_need_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distcp.filesystem import chunk_reader

    saved = random_tensor((8, 6), torch.float32, 3)
    writer = distcp.FileSystemWriter(tmp_path, checksum_block_size=64)
    distcp.save({"w": saved}, storage_writer=writer, no_dist=True)
    reads: list[int] = []
    original = chunk_reader.ChunkReader.read

    def counting(self: Any, targets: list[Any], report: Any) -> Any:
        reads.append(len(targets))
        return original(self, targets, report)

    monkeypatch.setattr(chunk_reader.ChunkReader, "read", counting)
    planner = TwoRegionPlanner()
    reader = distcp.FileSystemReader(tmp_path)
    distcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    assert raw(planner.pieces[0]) == raw(saved[:, :3])
    assert raw(planner.pieces[1]) == raw(saved[:, 3:])
    assert reads == [2]  # the chunk is read once, both pieces copied from it
    report = reader.report
    assert report.bytes_read == report.bytes_needed == saved.numel() * 4
    # The two pieces tile the chunk, so its split blocks are verified jointly
    # (here by the one rank alone) rather than re-read.
    assert report.split_blocks > 0 and report.bytes_verified == report.bytes_needed
