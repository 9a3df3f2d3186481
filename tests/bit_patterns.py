"""Tensors of random bit patterns and byte-exact comparison, for tests."""

from __future__ import annotations

import math

import torch


def raw(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as bytes, so NaN payloads and -0.0 compare too."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities and all), the same on every rank."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(
        0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=generator
    )
    if dtype == torch.bool:  # only 0 and 1 are valid bools
        data &= 1
    return data.view(dtype).reshape(shape)
