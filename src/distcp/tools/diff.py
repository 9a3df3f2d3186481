"""``distcp diff``: how two checkpoints differ, key by key.

Keys only in one, dtype or shape changes, and for tensors in both: identical
without reading a byte where both are distcp checkpoints with the same chunk
geometry and equal stored checksums (CRC-32C of every block), else read one
tensor at a time from each and compared (``torch.allclose`` with ``rtol`` and
``atol``, NaNs equal), with the largest absolute and relative difference.
Values are compared decoded.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from distcp.convert.sources import Source, open_source
from distcp.metadata import MetadataIndex, TensorStorageMetadata

__all__ = ["diff_checkpoints"]


def diff_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> dict[str, Any]:
    """``{"same": bool, "only_in_a", "only_in_b", "changed": [...], "identical": n}``."""
    first, second = open_source(a), open_source(b)
    keys_a, keys_b = set(first.keys), set(second.keys)
    changed: list[dict[str, Any]] = []
    identical = 0
    by_checksum = 0
    for key in [k for k in first.keys if k in keys_b]:
        in_a, in_b = key in first.tensors, key in second.tensors
        if in_a != in_b:
            changed.append({"key": key, "change": "tensor in one, value in the other"})
            continue
        if not in_a:
            if _value_equal(first.read_value(key), second.read_value(key)):
                identical += 1
            else:
                changed.append({"key": key, "change": "value differs"})
            continue
        info_a, info_b = first.tensors[key], second.tensors[key]
        if info_a.shape != info_b.shape or info_a.dtype != info_b.dtype:
            changed.append(
                {
                    "key": key,
                    "change": "dtype or shape",
                    "a": f"{str(info_a.dtype).removeprefix('torch.')} {list(info_a.shape)}",
                    "b": f"{str(info_b.dtype).removeprefix('torch.')} {list(info_b.shape)}",
                }
            )
            continue
        if _same_checksums(first, second, key):
            identical += 1
            by_checksum += 1
            continue
        found = _compare(first.read_tensor(key), second.read_tensor(key), rtol, atol)
        if found is None:
            identical += 1
        else:
            changed.append({"key": key, "change": "values", **found})
    only_a = [k for k in first.keys if k not in keys_b]
    only_b = [k for k in second.keys if k not in keys_a]
    return {
        "same": not (only_a or only_b or changed),
        "a": str(a),
        "b": str(b),
        "only_in_a": only_a,
        "only_in_b": only_b,
        "changed": changed,
        "identical": identical,
        "identical_by_checksum": by_checksum,
        "rtol": rtol,
        "atol": atol,
    }


def _same_checksums(first: Source, second: Source, key: str) -> bool:
    """Both distcp, same chunks, raw bytes with equal block checksums."""
    if first.kind != "distcp" or second.kind != "distcp":
        return False
    meta_a, meta_b = first.metadata, second.metadata  # type: ignore[attr-defined]
    entry_a, entry_b = meta_a.state_dict_metadata[key], meta_b.state_dict_metadata[key]
    assert isinstance(entry_a, TensorStorageMetadata) and isinstance(entry_b, TensorStorageMetadata)
    chunks_a = sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry_a.chunks)
    chunks_b = sorted((tuple(c.offsets), tuple(c.sizes)) for c in entry_b.chunks)
    if chunks_a != chunks_b:
        return False
    for offsets, _ in chunks_a:
        info_a = meta_a.storage_data[MetadataIndex(key, offsets)]
        info_b = meta_b.storage_data[MetadataIndex(key, offsets)]
        if info_a.codec is not None or info_b.codec is not None:
            return False
        if (info_a.length, info_a.checksum_block_size, tuple(info_a.checksums)) != (
            info_b.length,
            info_b.checksum_block_size,
            tuple(info_b.checksums),
        ):
            return False
    return True


def _compare(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> dict[str, Any] | None:
    """None when equal within tolerance; else the largest differences."""
    if x.numel() == 0:
        return None
    if torch.equal(
        x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
    ):
        return None
    if x.dtype.is_floating_point or x.dtype.is_complex:
        wide = torch.complex128 if x.dtype.is_complex else torch.float64
        xf, yf = x.to(wide), y.to(wide)
        close = torch.isclose(xf, yf, rtol=rtol, atol=atol, equal_nan=True)
        difference = (xf - yf).abs()
        difference = torch.where(torch.isnan(difference), torch.zeros_like(difference), difference)
        relative = difference / yf.abs().clamp_min(torch.finfo(torch.float64).tiny)
    else:
        xf, yf = x.to(torch.float64), y.to(torch.float64)
        difference = (xf - yf).abs()
        close = difference <= atol + rtol * yf.abs()
        relative = difference / yf.abs().clamp_min(1)
    if bool(close.all()):
        return None
    return {
        "max_abs_diff": float(difference.max()),
        "max_rel_diff": float(relative.real.max() if relative.is_complex() else relative.max()),
        "elements_differing": int((~close).sum()),
        "elements": x.numel(),
    }


def _value_equal(x: Any, y: Any) -> bool:
    try:
        result = x == y
        if isinstance(result, bool):
            return result
        return bool(getattr(result, "all", lambda: result)())
    except Exception:
        return repr(x) == repr(y)
