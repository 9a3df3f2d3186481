"""Tensors for transient, large buffers whose memory goes back to the system
the moment they are dropped.

A converter reads one chunk, hands it on, drops it, and reads the next. From
the C allocator, big blocks freed and allocated in turn can stay mapped (glibc
raises its mmap threshold after the first free and serves the next ones from
a heap that does not shrink), so resident memory would creep above what is
alive. A buffer over its own anonymous mapping is unmapped when the last
tensor viewing it dies: the converter's memory is what it holds, no more.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch

__all__ = ["transient_tensor"]

#: Below this many bytes a buffer comes from torch's allocator (a mapping per
#: small tensor would cost more than it saves).
_MAPPED_FROM = 1 << 20


def transient_tensor(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` and ``dtype``; a large one
    lives in a mapping of its own, released when the tensor is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MAPPED_FROM:
        return torch.empty(tuple(shape), dtype=dtype)
    region = mmap.mmap(-1, nbytes)  # anonymous, zero-filled on first touch
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).reshape(tuple(shape))
