"""Zero-copy views of tensor memory as bytes, and block checksums over them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import crc32c
import torch

from distcp.errors import CheckpointError

__all__ = [
    "block_checksums",
    "checksum_mismatch",
    "host_bytes",
    "narrowed",
    "require_little_endian",
    "writable_bytes",
]


def require_little_endian() -> None:
    """The format stores tensors little-endian, as memory holds them on every
    host distcp supports; refuse to write or read mislabelled bytes elsewhere."""
    if sys.byteorder != "little":
        raise CheckpointError(
            "distcp checkpoints are little-endian and this host is big-endian; "
            "byte-swapping is not supported"
        )


def host_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as row-major bytes, without a copy when the tensor
    is a dense contiguous CPU tensor (a view saves only its own bytes).
    Non-contiguous, conjugated or device tensors are copied once."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.is_conj():
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return _byte_view(tensor.reshape(-1))


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory, for ``readinto``."""
    return _byte_view(tensor.detach().reshape(-1))


def _byte_view(flat: torch.Tensor) -> memoryview:
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array)


def block_checksums(data: memoryview, block_size: int) -> tuple[int, ...]:
    """crc32c of each ``block_size`` block of ``data`` (the last may be short)."""
    return tuple(
        crc32c.crc32c(data[start : start + block_size]) for start in range(0, len(data), block_size)
    )


def checksum_mismatch(
    data: memoryview, first_block: int, expected: tuple[int, ...], block_size: int
) -> int | None:
    """Check ``data``, which starts at block ``first_block`` and spans whole
    blocks, against ``expected``; return the first bad block's number or None."""
    for n, start in enumerate(range(0, len(data), block_size)):
        block = first_block + n
        if crc32c.crc32c(data[start : start + block_size]) != expected[block]:
            return block
    return None


def narrowed(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The view of ``tensor`` at ``offsets`` with ``lengths`` in each dim."""
    for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor
