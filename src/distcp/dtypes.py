"""Dtype names and casting rules.

A checkpoint names each tensor's dtype with a stable string: the name of the
``torch`` attribute that holds it (``"float32"``, ``"bfloat16"``,
``"float8_e4m3fn"``), always the canonical spelling (``"float32"``, never the
alias ``"float"``). Names are read back through an explicit whitelist, so a
checkpoint can never make the loader look up an arbitrary attribute of
``torch``.

:func:`is_lossless_cast` says whether a saved dtype can fill a requested one
without changing any value, which is when a load may cast silently.
"""

from __future__ import annotations

import torch

from distcp.errors import CheckpointFormatError, UnsupportedValueError

__all__ = ["dtype_from_name", "dtype_name", "is_lossless_cast", "itemsize", "supported_dtypes"]

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
    "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "float8_e8m0fnu": torch.float8_e8m0fnu,
    "float4_e2m1fn_x2": torch.float4_e2m1fn_x2,
    "complex32": torch.complex32,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_NAMES_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES_BY_NAME.items()}

# Integer dtypes (and bool) with the inclusive range of values they hold.
_INT_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.bool: (0, 1),
    torch.int8: (-(2**7), 2**7 - 1),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.int64: (-(2**63), 2**63 - 1),
    torch.uint8: (0, 2**8 - 1),
    torch.uint16: (0, 2**16 - 1),
    torch.uint32: (0, 2**32 - 1),
    torch.uint64: (0, 2**64 - 1),
}

# Real floating dtypes that hold every integer n with |n| <= limit: 2 ** (mantissa bits + 1).
# float8_e8m0fnu is absent: it has no zero (it holds only powers of two and NaN).
_EXACT_INT_LIMITS: dict[torch.dtype, int] = {
    torch.float8_e4m3fn: 2**4,
    torch.float8_e4m3fnuz: 2**4,
    torch.float8_e5m2: 2**3,
    torch.float8_e5m2fnuz: 2**3,
    torch.float16: 2**11,
    torch.bfloat16: 2**8,
    torch.float32: 2**24,
    torch.float64: 2**53,
}

# For each real floating dtype, the other real floating dtypes that hold every one of its
# values (infinities and NaN included). The float8 rows are checked over all 256 bit
# patterns in tests/test_dtypes.py.
_FLOAT_WIDENINGS: dict[torch.dtype, frozenset[torch.dtype]] = {
    torch.float8_e4m3fn: frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    torch.float8_e4m3fnuz: frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    torch.float8_e5m2: frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    torch.float8_e5m2fnuz: frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
    torch.float8_e8m0fnu: frozenset({torch.bfloat16, torch.float32, torch.float64}),
    torch.float16: frozenset({torch.float32, torch.float64}),
    torch.bfloat16: frozenset({torch.float32, torch.float64}),
    torch.float32: frozenset({torch.float64}),
    torch.float64: frozenset(),
}

# Each complex dtype and the real dtype of its two parts.
_COMPLEX_PARTS: dict[torch.dtype, torch.dtype] = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Every dtype the checkpoint format can store, in a fixed order."""
    return tuple(_DTYPES_BY_NAME.values())


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name a checkpoint records for ``dtype`` (``torch.float`` → ``"float32"``).

    Raises :class:`UnsupportedValueError` for a dtype the format cannot store (the
    quantized and sub-byte dtypes)."""
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise UnsupportedValueError(
            f"dtype {dtype} cannot be stored in a distcp checkpoint; supported dtypes: "
            + ", ".join(_DTYPES_BY_NAME)
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """The dtype a checkpoint names ``name``, looked up in a fixed whitelist.

    Raises :class:`CheckpointFormatError` for any other name: the name came from a
    file, so an unknown one means a damaged checkpoint or one from a newer version."""
    try:
        return _DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise CheckpointFormatError(f"unknown dtype name {name!r} in checkpoint") from None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (1 for ``float4_e2m1fn_x2``, which packs two values)."""
    dtype_name(dtype)
    return dtype.itemsize


def is_lossless_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every value of ``src`` is exactly representable in ``dst``.

    True for the identity, for widening integer and floating casts, for integers into
    floating dtypes whose mantissa holds them all, and for real into complex dtypes
    under the same rules. False for everything else, including casts that are usually
    harmless but not always exact (``float32`` → ``bfloat16``, ``int64`` → ``float64``)."""
    if src == dst:
        return True
    dst_part = _COMPLEX_PARTS.get(dst, dst)
    if src in _INT_RANGES:
        low, high = _INT_RANGES[src]
        if dst in _INT_RANGES:
            dst_low, dst_high = _INT_RANGES[dst]
            return dst_low <= low and high <= dst_high
        limit = _EXACT_INT_LIMITS.get(dst_part)
        return limit is not None and -limit <= low and high <= limit
    if src in _COMPLEX_PARTS:
        return dst in _COMPLEX_PARTS and _real_float_fits(_COMPLEX_PARTS[src], dst_part)
    return _real_float_fits(src, dst_part)


def _real_float_fits(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether real floating ``src`` widens exactly into ``dst`` (False unless both are
    real floating dtypes)."""
    return src == dst or dst in _FLOAT_WIDENINGS.get(src, frozenset())
