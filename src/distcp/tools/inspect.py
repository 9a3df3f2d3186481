"""``distcp inspect``: what a checkpoint holds, from its metadata alone
(values, which are small, are decoded to show their type and a short repr)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from distcp.convert.sources import open_source, select_keys
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.filesystem.safe_open import read_regular_file
from distcp.metadata import TensorStorageMetadata
from distcp.metadata_file import read_save_facts
from distcp.value_codec import short_repr

__all__ = ["inspect_checkpoint", "layout_summary"]


def layout_summary(
    size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]]
) -> str:
    """How a tensor's saved chunks tile it: ``whole``, ``Shard(0) over 4``,
    ``grid 2×2 over dims 0,1``, or ``N chunks``."""
    if len(chunks) == 1 and tuple(chunks[0][1]) == tuple(size):
        return "whole"
    if not chunks:
        return "no chunks"
    split = [d for d in range(len(size)) if len({offsets[d] for offsets, _ in chunks}) > 1]
    counts = [len({offsets[d] for offsets, _ in chunks}) for d in split]
    product = 1
    for count in counts:
        product *= count
    if product != len(chunks):
        return f"{len(chunks)} chunks"
    if len(split) == 1:
        return f"Shard({split[0]}) over {counts[0]}"
    return f"grid {'×'.join(map(str, counts))} over dims {','.join(map(str, split))}"


def inspect_checkpoint(
    path: str | os.PathLike[str], keys: list[str] | None = None
) -> dict[str, Any]:
    """Everything ``distcp inspect`` prints, as a dict."""
    source = open_source(path)
    chosen = set(select_keys(source.keys, keys, where=str(path)))
    out: dict[str, Any] = {"path": str(path), "format": source.kind}
    metadata_file = Path(path) / METADATA_FILE_NAME
    if source.kind == "distcp":
        facts = read_save_facts(
            read_regular_file(metadata_file, "metadata file"), source=str(metadata_file)
        )
        out["format_version"] = facts.version
        out["saved"] = (
            datetime.datetime.fromtimestamp(facts.created)
            .astimezone()
            .isoformat(timespec="seconds")
        )
        out["world_size"] = facts.world_size
        out["save_id"] = facts.save_id
    metadata = getattr(source, "metadata", None)
    tensors = []
    for key, info in source.tensors.items():
        if key not in chosen:
            continue
        entry = metadata.state_dict_metadata[key] if metadata is not None else None
        if isinstance(entry, TensorStorageMetadata):
            chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        else:
            chunks = [((0,) * len(info.shape), info.shape)]
        tensors.append(
            {
                "key": key,
                "dtype": str(info.dtype).removeprefix("torch."),
                "shape": list(info.shape),
                "bytes": info.nbytes,
                "chunks": len(chunks),
                "layout": layout_summary(info.shape, chunks),
            }
        )
    values = []
    for key in source.values:
        if key not in chosen:
            continue
        value = source.read_value(key)
        values.append({"key": key, "type": type(value).__name__, "repr": short_repr(value)})
    out["tensors"] = tensors
    out["values"] = values
    out["totals"] = {
        "tensors": len(tensors),
        "values": len(values),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
    }
    return out
