"""Verifying checksum blocks that no single rank reads whole.

A resharding load reads, on each rank, only the bytes its shards need, so one
checksum block of a saved chunk is often split between ranks (a chunk saved
row-wise and loaded column-wise gives each rank a slice of every row). Reading
the whole block on every rank to verify it would double what a column split
reads; leaving it unverified would break the promise that every byte loaded
was checked.

crc32c is affine over GF(2): for messages of one length L,
``crc(a ^ b) == crc(a) ^ crc(b) ^ crc(0^L)``. So if each rank computes the crc
of the block with every byte it did not read set to zero (its *masked* crc),
and the ranks' pieces are disjoint and together cover the block, then the XOR
of the k masked crcs, XORed with ``crc(0^L)`` when k is even, is the crc of the
block. Ranks exchange only these 4-byte values, one per split block.

The coordinator decides where this works (:func:`plan_block_verification`):
for each saved chunk it collects the distinct regions the ranks read (ranks
that replicate a region read the same region; the lowest of them contributes
for it). When those regions are pairwise disjoint and tile the chunk exactly,
the chunk is *cooperative*. Elsewhere (a partial load, a custom plan) a rank
reads every split block whole and verifies it alone.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass, field

import crc32c

from distcp.errors import CorruptCheckpointError
from distcp.geometry import Box, find_overlap
from distcp.metadata import Metadata, MetadataIndex, StorageInfo, TensorStorageMetadata
from distcp.planner import LoadItemType, LoadPlan

__all__ = [
    "BlockKey",
    "VerificationPlan",
    "checksum_error",
    "combine_masked_crcs",
    "plan_block_verification",
    "verify_masked_crcs",
]

#: A checksum block: the saved chunk it belongs to and its number in the chunk.
BlockKey = tuple[MetadataIndex, int]


@dataclass(frozen=True)
class VerificationPlan:
    """One rank's part in verifying split blocks, sent in ``LoadPlan.storage_data``.

    ``cooperative``: chunks whose split blocks are verified across ranks.
    ``contributes``: ``(chunk, region offsets)`` of the regions this rank
    contributes masked crcs for (the lowest rank reading each distinct region).
    """

    cooperative: frozenset[MetadataIndex] = field(default_factory=frozenset)
    contributes: frozenset[tuple[MetadataIndex, tuple[int, ...]]] = field(default_factory=frozenset)


def plan_block_verification(plans: list[LoadPlan], metadata: Metadata) -> list[VerificationPlan]:
    """Each rank's :class:`VerificationPlan`, from every rank's load plan.

    A chunk read only whole (the same layout as saved, or replicated readers)
    has no split blocks and is left out, so the common case costs one tuple
    comparison per item."""
    Region = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, lengths) in the chunk
    regions: dict[MetadataIndex, dict[Region, int]] = defaultdict(dict)
    for rank, plan in enumerate(plans):
        for item in plan.items:
            if item.type == LoadItemType.TENSOR:
                region = (tuple(item.storage_offsets), tuple(item.lengths))
                regions[item.storage_index].setdefault(region, rank)
    chunk_sizes = _chunk_sizes(metadata, {index.fqn for index in regions})
    cooperative: set[MetadataIndex] = set()
    contributes: list[set[tuple[MetadataIndex, tuple[int, ...]]]] = [set() for _ in plans]
    for index, owners in regions.items():
        info = metadata.storage_data.get(index) if isinstance(metadata.storage_data, dict) else None
        if getattr(info, "codec", None) is not None:
            continue  # a compressed chunk is read and verified whole by each reader
        sizes = chunk_sizes.get((index.fqn, index.offset))
        if sizes is None or (len(owners) == 1 and next(iter(owners))[1] == sizes):
            continue  # unknown (the reader reports it), or only ever read whole
        boxes = [Box(offsets, lengths) for offsets, lengths in owners]
        if not _tiles(boxes, Box.full(sizes)):
            continue
        cooperative.add(index)
        for (offsets, _), rank in owners.items():
            contributes[rank].add((index, offsets))
    shared = frozenset(cooperative)
    return [VerificationPlan(shared, frozenset(mine)) for mine in contributes]


def _chunk_sizes(
    metadata: Metadata, fqns: set[str]
) -> dict[tuple[str, tuple[int, ...] | None], tuple[int, ...]]:
    sizes: dict[tuple[str, tuple[int, ...] | None], tuple[int, ...]] = {}
    for fqn in fqns:
        entry = metadata.state_dict_metadata.get(fqn)
        if isinstance(entry, TensorStorageMetadata):
            for chunk in entry.chunks:
                sizes[(fqn, tuple(chunk.offsets))] = tuple(chunk.sizes)
    return sizes


def _tiles(boxes: list[Box], whole: Box) -> bool:
    """True when ``boxes`` are pairwise disjoint and cover ``whole`` exactly."""
    if sum(box.numel for box in boxes) != whole.numel:
        return False
    return find_overlap(boxes) is None


@functools.lru_cache(maxsize=64)
def _zeros_crc(length: int) -> int:
    return int(crc32c.crc32c(bytes(length)))


def block_length(info: StorageInfo, block: int) -> int:
    """Bytes in checksum block ``block`` of the chunk stored at ``info``."""
    start = block * info.checksum_block_size
    return min(info.checksum_block_size, info.length - start)


def combine_masked_crcs(masked: list[int], length: int) -> int:
    """The crc32c of a ``length``-byte block from the masked crcs of disjoint
    pieces that cover it (see the module docstring)."""
    combined = 0
    for value in masked:
        combined ^= value
    if len(masked) % 2 == 0:
        combined ^= _zeros_crc(length)
    return combined


def verify_masked_crcs(
    contributions: list[dict[BlockKey, int]],
    storage: dict[MetadataIndex, StorageInfo],
    directory: str,
) -> int:
    """Check every split block against its stored checksum, from all ranks'
    masked crcs; return how many blocks were checked. Raises
    :class:`CorruptCheckpointError` naming the file and byte offset of the
    first bad block (the same on every rank, as every rank checks them all)."""
    by_block: dict[BlockKey, list[int]] = defaultdict(list)
    for rank_contribution in contributions:
        for key, value in rank_contribution.items():
            by_block[key].append(value)
    for (index, block), masked in sorted(by_block.items(), key=_block_order):
        info = storage[index]
        if combine_masked_crcs(masked, block_length(info, block)) != info.checksums[block]:
            raise checksum_error(
                f"{directory}/{info.relative_path}",
                index,
                info,
                block,
                detail=f", a block read in parts by {len(masked)} rank(s)",
            )
    return len(by_block)


def checksum_error(
    path: str, index: MetadataIndex, info: StorageInfo, block: int, *, detail: str = ""
) -> CorruptCheckpointError:
    """The error for checksum block ``block`` of the item stored at ``info``,
    naming the file, the block's byte offset in it, the key and, for a tensor
    chunk, the chunk's offsets."""
    offset = info.offset + block * info.checksum_block_size
    chunk = f", chunk at {list(index.offset)}" if index.offset is not None else ""
    return CorruptCheckpointError(
        f"checksum mismatch in {path} at byte offset {offset} (key {index.fqn!r}"
        f"{chunk}{detail}): the data file is corrupt",
        file=path,
        offset=offset,
    )


def _block_order(entry: tuple[BlockKey, list[int]]) -> tuple[str, tuple[int, ...], int]:
    (index, block), _ = entry
    return index.fqn, index.offset or (), block
