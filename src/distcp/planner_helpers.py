"""DCP's ``planner_helpers`` module path."""

from __future__ import annotations

import torch

from distcp.geometry import Box, intersect
from distcp.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from distcp.planner import LoadItemType, ReadItem

__all__ = ["create_read_items_for_chunk_list"]


def create_read_items_for_chunk_list(
    fqn: str,
    checkpoint_md: TensorStorageMetadata,
    local_chunks: list[ChunkStorageMetadata],
) -> list[ReadItem]:
    """One read per (local chunk, saved chunk) pair that overlap: the overlap's
    box, relative to each."""
    items = []
    saved = [Box(tuple(c.offsets), tuple(c.sizes)) for c in checkpoint_md.chunks]
    for local in local_chunks:
        wanted = Box(tuple(local.offsets), tuple(local.sizes))
        for box in saved:
            overlap = intersect(wanted, box)
            if overlap is None or (overlap.is_empty and wanted.ndim):
                continue
            items.append(
                ReadItem(
                    type=LoadItemType.TENSOR,
                    dest_index=MetadataIndex(fqn, wanted.offsets),
                    dest_offsets=torch.Size(overlap.relative_to(wanted).offsets),
                    storage_index=MetadataIndex(fqn, box.offsets),
                    storage_offsets=torch.Size(overlap.relative_to(box).offsets),
                    lengths=torch.Size(overlap.sizes),
                )
            )
    return items
