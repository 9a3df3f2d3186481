"""Tests for distcp.dtypes: names round-trip and the lossless-cast table is true.

The cast table is checked against torch itself: exhaustively over every bit pattern
for 8- and 16-bit sources, and on edge values for wider ones."""

from __future__ import annotations

import cmath
import math

import pytest
import torch

from distcp.dtypes import (
    dtype_from_name,
    dtype_name,
    is_lossless_cast,
    itemsize,
    supported_dtypes,
)
from distcp.errors import CheckpointFormatError, UnsupportedValueError

ALL = supported_dtypes()
# float4_e2m1fn_x2 packs two values per byte and torch cannot cast it at all.
CASTABLE = tuple(d for d in ALL if d != torch.float4_e2m1fn_x2)
BITS_VIEW = {1: torch.uint8, 2: torch.uint16}
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 is "experimental"


def test_names_are_the_canonical_torch_attribute_names() -> None:
    for dtype in ALL:
        name = dtype_name(dtype)
        assert getattr(torch, name) is dtype
        assert dtype_from_name(name) is dtype
        assert itemsize(dtype) == dtype.itemsize
    assert dtype_name(torch.float) == "float32"
    assert dtype_name(torch.half) == "float16"
    assert dtype_name(torch.long) == "int64"
    assert dtype_name(torch.cfloat) == "complex64"
    assert dtype_name(torch.chalf) == "complex32"
    assert itemsize(torch.float4_e2m1fn_x2) == 1


def test_every_byte_sized_or_wider_cpu_dtype_is_covered() -> None:
    expected = {
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
        "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    }  # fmt: skip
    assert {dtype_name(d) for d in ALL} == expected
    for dtype in ALL:
        assert torch.empty(2, dtype=dtype).dtype is dtype


@pytest.mark.parametrize("dtype", [torch.qint8, torch.quint8, torch.qint32, torch.uint4])
def test_unsupported_dtype_is_refused(dtype: torch.dtype) -> None:
    with pytest.raises(UnsupportedValueError, match=str(dtype)):
        dtype_name(dtype)
    with pytest.raises(UnsupportedValueError):
        itemsize(dtype)


@pytest.mark.parametrize("name", ["float", "half", "long", "qint8", "Tensor", "__class__", ""])
def test_unknown_or_alias_name_is_a_format_error(name: str) -> None:
    with pytest.raises(CheckpointFormatError, match=repr(name)):
        dtype_from_name(name)


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every value of an 8- or 16-bit dtype, as a 1-D tensor of that dtype."""
    if dtype == torch.bool:
        return torch.tensor([False, True])
    count = 2 ** (8 * dtype.itemsize)
    bits = torch.arange(count, dtype=torch.int64).to(BITS_VIEW[dtype.itemsize])
    return bits.view(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element of two 1-D tensors of one dtype: whether their bytes are equal."""
    a_bytes = a.contiguous().view(torch.uint8).reshape(a.numel(), -1)
    b_bytes = b.contiguous().view(torch.uint8).reshape(b.numel(), -1)
    return (a_bytes == b_bytes).all(dim=1)


def _exact_by_torch(values: torch.Tensor, dst: torch.dtype) -> bool:
    """Whether casting ``values`` to ``dst`` keeps every value and casts back bit for bit
    (NaN only needs to stay NaN)."""
    cast = values.to(dst)
    wide_src = values.to(torch.complex128)
    wide_dst = cast.to(torch.complex128)
    src_nan = torch.isnan(wide_src)
    same_value = (wide_src == wide_dst) | (src_nan & torch.isnan(wide_dst))
    back = cast.to(values.dtype)
    same_bits = _same_bits(values, back) | (src_nan & torch.isnan(back.to(torch.complex128)))
    return bool(same_value.all()) and bool(same_bits.all())


SMALL = [d for d in CASTABLE if d.itemsize <= 2 and d != torch.complex32]


@pytest.mark.parametrize("src", SMALL, ids=dtype_name)
def test_lossless_cast_is_exact_over_every_bit_pattern(src: torch.dtype) -> None:
    values = _all_values(src)
    for dst in CASTABLE:
        assert is_lossless_cast(src, dst) == _exact_by_torch(values, dst), (src, dst)


def _as_python(value: object) -> complex | float | int:
    assert isinstance(value, (bool, int, float, complex))
    return value


def _same_python_value(a: object, b: object) -> bool:
    x, y = _as_python(a), _as_python(b)
    if cmath.isnan(x):
        return cmath.isnan(y)
    return x == y  # exact, even between int and float


def _edge_values(dtype: torch.dtype) -> torch.Tensor:
    """Values of a wide dtype that catch every inexact cast out of it."""
    if dtype in (torch.int32, torch.int64, torch.uint32, torch.uint64):
        info = torch.iinfo(dtype)
        candidates = [0, 1, -1, 255, 257, 2**24 + 1, 2**31 - 1, 2**53 + 1, 2**63 - 1, 2**64 - 1]
        ints = [info.min, info.max] + [c for c in candidates if info.min <= c <= info.max]
        return torch.tensor(ints, dtype=dtype)
    real = [0.0, -0.0, 1.0, 0.5, 1 / 3, 1 + 2**-10, 1e-10, 1e5, 2.0**24 + 1, 1e-45, 1e300,
            1e-310, math.inf, -math.inf, math.nan]  # fmt: skip
    if dtype in (torch.complex64, torch.complex128, torch.complex32):
        pairs = [complex(r, i) for r in real for i in (0.0, 2.5, 1 / 3)]
        return torch.tensor(pairs, dtype=torch.complex128).to(dtype)
    return torch.tensor(real, dtype=torch.float64).to(dtype)


WIDE = [d for d in CASTABLE if d not in SMALL]


@pytest.mark.parametrize("src", WIDE, ids=dtype_name)
def test_lossless_cast_on_edge_values_of_wide_dtypes(src: torch.dtype) -> None:
    values = _edge_values(src)
    nan = torch.isnan(values.to(torch.complex128))
    originals = _python_values(values)
    for dst in CASTABLE:
        cast = values.to(dst)
        back = cast.to(src)
        kept_values = all(map(_same_python_value, originals, _python_values(cast)))
        kept_bits = _same_bits(values, back) | (nan & torch.isnan(back.to(torch.complex128)))
        exact = kept_values and bool(kept_bits.all())
        assert is_lossless_cast(src, dst) == exact, (src, dst)


def _python_values(values: torch.Tensor) -> list[object]:
    if values.dtype == torch.complex32:  # tolist() does not support it
        values = values.to(torch.complex128)
    result: list[object] = values.tolist()
    return result


def test_examples_from_the_spec() -> None:
    assert is_lossless_cast(torch.bool, torch.float8_e4m3fn)
    assert is_lossless_cast(torch.int32, torch.float64)
    assert is_lossless_cast(torch.float8_e5m2, torch.bfloat16)
    assert is_lossless_cast(torch.float16, torch.complex32)
    assert is_lossless_cast(torch.complex32, torch.complex128)
    assert not is_lossless_cast(torch.float32, torch.bfloat16)
    assert not is_lossless_cast(torch.int64, torch.float64)
    assert not is_lossless_cast(torch.float32, torch.int64)
    assert not is_lossless_cast(torch.complex64, torch.float64)
    assert not is_lossless_cast(torch.bool, torch.float8_e8m0fnu)  # e8m0 has no zero
    assert not is_lossless_cast(torch.float4_e2m1fn_x2, torch.float32)
    assert is_lossless_cast(torch.float4_e2m1fn_x2, torch.float4_e2m1fn_x2)
