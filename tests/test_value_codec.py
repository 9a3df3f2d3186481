"""Tests for distcp.value_codec: values round-trip with their types, unsupported values
are refused with the key and path, pickle needs an opt-in on both sides, and no input
makes the decoder raise anything but a CheckpointError or run code."""

from __future__ import annotations

import collections
import io
import math
import os
import random
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distcp
from distcp.dtypes import dtype_name, supported_dtypes
from distcp.errors import (
    CheckpointFormatError,
    PickleNotAllowedError,
    UnsupportedValueError,
)
from distcp.value_codec import (
    EXT_BIGINT,
    EXT_COMPLEX,
    EXT_NUMPY_ARRAY,
    EXT_NUMPY_SCALAR,
    EXT_PICKLE,
    EXT_SET,
    EXT_TORCH_DEVICE,
    EXT_TORCH_DTYPE,
    EXT_TORCH_SIZE,
    EXT_TORCH_TENSOR,
    EXT_TUPLE,
    MAX_DEPTH,
    decode_value,
    encode_value,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # complex32, sparse, quantized

NUMPY_CODES = ["?", "i1", "u1", "<i2", ">i2", "<i4", ">i4", "<i8", ">i8", "<u2", ">u2", "<u4",
               ">u4", "<u8", ">u8", "<f2", ">f2", "<f4", ">f4", "<f8", ">f8", "<c8", ">c8",
               "<c16", ">c16"]  # fmt: skip


# ----- helpers ---------------------------------------------------------------------------


def assert_same(a: object, b: object) -> None:
    """Recursive equality that also demands equal types at every level, floats equal bit
    for bit (NaN payloads, -0.0) and tensors and arrays equal byte for byte."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b)  # type: ignore[arg-type]
    elif isinstance(a, complex):
        assert isinstance(b, complex)
        assert struct.pack("<dd", a.real, a.imag) == struct.pack("<dd", b.real, b.imag)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert isinstance(b, dict)
        assert len(a) == len(b)
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb)
            assert_same(va, vb)
    elif isinstance(a, (set, frozenset)):
        assert isinstance(b, (set, frozenset))
        assert _canonical(a) == _canonical(b)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert _tensor_bytes(a) == _tensor_bytes(b)
        assert b.device.type == "cpu" and b.is_contiguous() and not b.requires_grad
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray)
        assert (a.dtype.str, a.shape) == (b.dtype.str, b.shape)
        assert a.tobytes() == b.tobytes()
        assert b.flags.writeable and b.flags.owndata
    elif isinstance(a, np.generic):
        assert isinstance(b, np.generic)
        assert a.tobytes() == b.tobytes()
    else:
        assert a == b


def _typed_repr(value: object) -> str:
    return f"{type(value).__name__}:{value!r}"


def _canonical(value: object) -> str:
    """A string equal for two hashable values exactly when they are the same in the sense
    of assert_same, whatever the iteration order of sets inside them."""
    if isinstance(value, float):
        return f"float:{struct.pack('<d', value).hex()}"
    if isinstance(value, complex):
        return f"complex:{struct.pack('<dd', value.real, value.imag).hex()}"
    if type(value) is tuple:
        return "tuple(" + ",".join(map(_canonical, value)) + ")"
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}{{" + ",".join(sorted(map(_canonical, value))) + "}"
    return _typed_repr(value)


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes())


def roundtrip(value: object, *, allow_pickle: bool = False) -> object:
    data = encode_value(value, key="k", allow_pickle=allow_pickle)
    result = decode_value(data, key="k", allow_pickle=allow_pickle)
    assert_same(value, result)
    assert encode_value(result, key="k", allow_pickle=allow_pickle) == data  # deterministic
    return result


def ext(code: int, payload: object) -> msgpack.ExtType:
    """An extension value whose payload is ``payload`` (bytes as they are, else packed)."""
    data = payload if isinstance(payload, bytes) else msgpack.packb(payload, use_bin_type=True)
    return msgpack.ExtType(code, data)


def raw_ext(code: int, payload: bytes) -> bytes:
    """An ext 8 value with any code, negative ones included (ExtType refuses those)."""
    return b"\xc7" + bytes([len(payload)]) + struct.pack("b", code) + payload


def pack(tree: object) -> bytes:
    packed: bytes = msgpack.packb(tree, use_bin_type=True)
    return packed


def decode_or_format_error(data: bytes) -> None:
    """Decoding ``data`` either works or raises one of the codec's own errors."""
    try:
        decode_value(data, key="fuzz")
    except (CheckpointFormatError, PickleNotAllowedError) as exc:
        assert "'fuzz'" in str(exc)


class Thing:
    """A plain user class: not supported without pickle."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return type(other) is Thing and other.n == self.n

    def __hash__(self) -> int:
        return self.n


class Point(NamedTuple):
    x: int
    y: int


# ----- round trips -----------------------------------------------------------------------

EXAMPLES: list[object] = [
    None, True, False, 0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**100,
    -(10**100), 0.0, -0.0, 1.5, math.inf, -math.inf, math.nan,
    struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0],  # NaN with a payload
    struct.unpack("<d", b"\x00\x00\x00\x00\x00\x00\xf8\xff")[0],  # negative NaN
    5e-324, 1 + 2j, complex(-0.0, math.nan), "", "héllo ✓", b"", b"\x00\xff", bytearray(b"ab"),
    bytearray(), [], (), {}, set(), frozenset(), [1, [2, [3]]], (1, (2, (3,))), ((),), [()],
    ([], {}), {"a": 1, "b": [1, 2]}, {1: "int key", 2.5: "float", None: 0, False: 1, b"x": 2},
    {(1, 2): "tuple key", ((1,), "a"): 2, frozenset({1, 2}): 3, 10**30: 4},
    {"z": 1, "a": 2, "m": 3}, {1, 2, 3}, {"a", "b", (1, 2)}, frozenset({frozenset({1}), 2}),
    torch.Size([]), torch.Size([2, 3]), torch.float32, torch.bfloat16, torch.float8_e8m0fnu,
    torch.device("cpu"), torch.device("cuda", 1), torch.device("cuda"), torch.device("meta"),
    np.bool_(True), np.int8(-3), np.uint64(2**64 - 1), np.float16(1.5), np.float32(math.nan),
    np.float64(-0.0), np.complex64(1 - 1j), np.complex128(3j), np.int64(7), np.uint16(9),
]  # fmt: skip


@pytest.mark.parametrize("value", EXAMPLES, ids=_typed_repr)
def test_round_trip_examples(value: object) -> None:
    roundtrip(value)
    roundtrip([value, {"nested": (value,)}])


def test_big_ints_use_the_extension_only_outside_the_native_range() -> None:
    assert encode_value(2**64 - 1, key="k") == pack(2**64 - 1)
    assert encode_value(-(2**63), key="k") == pack(-(2**63))
    assert encode_value(2**64, key="k") == pack(ext(EXT_BIGINT, b"\x01" + b"\x00" * 8))
    assert encode_value(-(2**63) - 1, key="k") == pack(ext(EXT_BIGINT, b"\xff\x7f" + b"\xff" * 7))


def test_dict_keeps_insertion_order_and_key_types() -> None:
    value = {3: "a", "3": "b", (3,): "c", 3.5: "d", b"3": "e", None: "f"}
    result = roundtrip(value)
    assert isinstance(result, dict)
    assert [type(k) for k in result] == [int, str, tuple, float, bytes, type(None)]


def test_realistic_training_state() -> None:
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    state = {
        "param_groups": optim.state_dict()["param_groups"],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(0).bit_generator.state,
        "numpy_legacy_rng": np.random.RandomState(0).get_state(),
        "python_rng": random.Random(0).getstate(),
        "step": 1000,
        "config": {"dtype": torch.bfloat16, "shape": torch.Size([4, 8]), "device": "cuda:0"},
    }
    roundtrip(state)


TENSOR_DTYPES = supported_dtypes()


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=dtype_name)
def test_tensor_of_every_dtype(dtype: torch.dtype) -> None:
    raw = torch.arange(24 * dtype.itemsize, dtype=torch.int64).to(torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    tensor = raw.view(dtype).reshape(2, 3, 4)
    roundtrip(tensor)
    roundtrip(tensor[0, 0, 0])  # 0-d
    roundtrip(tensor[:, :0])  # empty
    roundtrip(tensor.transpose(0, 2))  # not contiguous
    roundtrip(torch.empty(0, dtype=dtype))


def test_tensor_views_and_grad_are_materialized() -> None:
    base = torch.tensor([1 + 2j, 3 - 4j])
    assert_same(
        base.conj().resolve_conj(), decode_value(encode_value(base.conj(), key="k"), key="k")
    )
    neg = torch.tensor([1.0, 2.0])._neg_view()
    assert_same(neg.resolve_neg(), decode_value(encode_value(neg, key="k"), key="k"))
    leaf = torch.ones(2, requires_grad=True)
    result = decode_value(encode_value(leaf, key="k"), key="k")
    assert isinstance(result, torch.Tensor) and not result.requires_grad


def test_decoded_tensor_owns_writable_memory_without_warnings() -> None:
    data = encode_value([torch.arange(4.0), torch.empty(0)], key="k")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = decode_value(data, key="k")
    assert isinstance(tensors, list)
    first = tensors[0]
    first.add_(1)
    assert first.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert first.untyped_storage().nbytes() == 16


@pytest.mark.parametrize("code", NUMPY_CODES)
def test_ndarray_of_every_dtype(code: str) -> None:
    dtype = np.dtype(code)
    raw = np.arange(24 * dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "b":
        raw = raw % 2
    array = raw.view(dtype).reshape(2, 3, 4)
    roundtrip(array)
    roundtrip(array[0, 0, 0].copy().reshape(()))  # 0-d array
    roundtrip(array[:, :0])
    roundtrip(array.transpose(2, 0, 1))
    scalar = array.reshape(-1)[5]
    if dtype.isnative:
        roundtrip(scalar)


@given(st.data())
@settings(max_examples=50, deadline=None)
def test_ndarray_random_contents(data: st.DataObject) -> None:
    dtype = np.dtype(data.draw(st.sampled_from(NUMPY_CODES)))
    shape = data.draw(st.lists(st.integers(0, 3), max_size=3))
    size = math.prod(shape) * dtype.itemsize
    if dtype.kind == "b":
        raw = bytes(data.draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
    else:
        raw = data.draw(st.binary(min_size=size, max_size=size))
    roundtrip(np.frombuffer(raw, dtype=dtype).reshape(shape).copy())


# ----- hypothesis: nested values ---------------------------------------------------------


def _tensors() -> st.SearchStrategy[torch.Tensor]:
    @st.composite
    def build(draw: st.DrawFn) -> torch.Tensor:
        dtype = draw(st.sampled_from(TENSOR_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = math.prod(shape) * dtype.itemsize
        if dtype == torch.bool:
            raw = bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
        else:
            raw = draw(st.binary(min_size=size, max_size=size))
        flat = torch.tensor(list(raw), dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)

    return build()


HASHABLE_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats()
    | st.complex_numbers()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(TENSOR_DTYPES)
    | st.sampled_from([torch.device("cpu"), torch.device("cuda", 3)])
    | st.lists(st.integers(0, 5), max_size=3).map(torch.Size)
    | st.sampled_from([np.int8(-1), np.float32(0.5), np.bool_(False), np.complex128(1j)])
)
HASHABLES = st.recursive(
    HASHABLE_LEAVES,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
LEAVES = HASHABLES | st.binary(max_size=8).map(bytearray) | _tensors()
VALUES = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(HASHABLES, inner, max_size=4)
        | st.sets(HASHABLES, max_size=4)
    ),
    max_leaves=12,
)


@given(VALUES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_hypothesis(value: object) -> None:
    roundtrip(value)


# ----- unsupported values ----------------------------------------------------------------


def _unsupported_values() -> list[object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = torch.sparse_coo_tensor([[0]], [1.0], (2,))
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    return [sparse, quantized]


UNSUPPORTED: list[object] = [*_unsupported_values(),
    Thing(1), object(), lambda: 0, os, print, collections.OrderedDict(a=1), Point(1, 2),
    torch.nn.Parameter(torch.ones(2)), torch.ones(2, device="meta"),
    torch.qint8,
    np.array([object()], dtype=object), np.zeros(2, dtype="i4,f4"),
    np.zeros(2, dtype="datetime64[ns]"), np.zeros(2, dtype=np.longdouble), np.datetime64(0, "s"),
    np.longlong(3), "\ud800", Path("/tmp"), range(3), Ellipsis, type, 1.5j.__class__,
]  # fmt: skip


@pytest.mark.parametrize("value", UNSUPPORTED, ids=lambda v: type(v).__name__)
def test_unsupported_values_name_key_and_path(value: object) -> None:
    with pytest.raises(UnsupportedValueError, match=r"^key 'optim' at \[0\]\['fn'\]: cannot save"):
        encode_value([{"fn": value}], key="optim")
    with pytest.raises(UnsupportedValueError, match=r"^key 'top': cannot save .*allow_pickle=True"):
        encode_value(value, key="top")


def test_unsupported_message_names_type_and_fix() -> None:
    name = re.escape(f"{Thing.__module__}.Thing")
    with pytest.raises(UnsupportedValueError) as info:
        encode_value({"param_groups": [{"fn": Thing(1)}]}, key="optim")
    message = str(info.value)
    assert re.search(
        rf"at \['param_groups'\]\[0\]\['fn'\]: cannot save a value of type {name}", message
    )
    assert "torch.Tensor" in message and "numpy" in message
    assert "DefaultSavePlanner(allow_pickle=True)" in message
    assert "DefaultLoadPlanner(allow_pickle=True)" in message


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({Thing(1): 0}, r"<key #0>"),
        ({"a": {1: 2, Thing(2): 3}}, r"\['a'\]<key #1>"),
        ((1, (2, Thing(3))), r"\[1\]\[1\]"),
        ({"s": {Thing(4)}}, r"\['s'\]<set item>"),
    ],
)
def test_path_reaches_keys_set_items_and_tuples(value: object, path: str) -> None:
    with pytest.raises(UnsupportedValueError, match=rf"^key 'k' at {path}: cannot save"):
        encode_value(value, key="k")


def test_nesting_limit() -> None:
    value: object = 0
    for _ in range(MAX_DEPTH):
        value = [value]
    roundtrip(value)
    with pytest.raises(UnsupportedValueError, match="nested more than"):
        encode_value([value], key="k")


# ----- pickle ----------------------------------------------------------------------------

PICKLABLE: list[object] = [
    Thing(1), collections.OrderedDict(a=1), Point(1, 2), range(3), Ellipsis,
    np.datetime64(0, "s"), Path("/tmp"),
]  # fmt: skip


@pytest.mark.parametrize("value", PICKLABLE, ids=lambda v: type(v).__name__)
def test_pickle_opt_in_round_trip(value: object) -> None:
    result = roundtrip({"x": [value]}, allow_pickle=True)
    assert isinstance(result, dict)
    assert type(result["x"][0]) is type(value)


def test_pickle_opt_in_round_trip_of_unusual_tensors() -> None:
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (2,))
    param = torch.nn.Parameter(torch.ones(2))
    result = decode_value(
        encode_value([sparse, param], key="k", allow_pickle=True), key="k", allow_pickle=True
    )
    assert isinstance(result, list)
    assert result[0].layout == torch.sparse_coo
    assert result[0].to_dense().tolist() == [1.0, 0.0]
    assert type(result[1]) is torch.nn.Parameter


def test_only_unsupported_leaves_are_pickled() -> None:
    data = encode_value({"a": [1, Thing(2)], "b": "text"}, key="k", allow_pickle=True)
    tree = msgpack.unpackb(data, raw=False)
    assert tree["b"] == "text" and tree["a"][0] == 1
    assert isinstance(tree["a"][1], msgpack.ExtType) and tree["a"][1].code == EXT_PICKLE


def test_unpicklable_value_still_fails_with_opt_in() -> None:
    with pytest.raises(UnsupportedValueError, match=r"^key 'k' at \[0\]: .*does not pickle"):
        encode_value([lambda: 0], key="k", allow_pickle=True)


MARKER: list[str] = []


def _plant_marker(path: str) -> None:
    MARKER.append(path)
    Path(path).write_text("code ran")


class Trap:
    """Unpickling this creates a marker file and sets a global."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return (_plant_marker, (self.path,))


def test_pickled_value_refused_without_opt_in_and_no_code_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = encode_value({"cfg": [Trap(str(marker))]}, key="opt", allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(PickleNotAllowedError) as info:
        decode_value(data, key="opt")
    message = str(info.value)
    assert "'opt'" in message and "['cfg'][0]" in message and "Trap" in message
    assert "DefaultLoadPlanner(allow_pickle=True)" in message
    assert not marker.exists() and not MARKER
    decode_value(data, key="opt", allow_pickle=True)  # the trap is real
    assert marker.exists() and [str(marker)] == MARKER
    MARKER.clear()


def test_pickle_refused_deep_inside_other_extensions(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data = encode_value({(1, 2): frozenset({(Trap(str(marker)),)})}, key="k", allow_pickle=True)
    with pytest.raises(PickleNotAllowedError, match="'k'"):
        decode_value(data, key="k")
    assert not marker.exists()


# ----- malformed input -------------------------------------------------------------------


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_escape(data: bytes) -> None:
    decode_or_format_error(data)


@given(st.binary(min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_random_extension_payloads_never_escape(payload: bytes) -> None:
    for code in range(-2, 16):
        decode_or_format_error(raw_ext(code, payload))
        decode_or_format_error(b"\x91" + raw_ext(code, payload[1:]))


SAMPLE: object = {
    "a": [1, 2**70, 1.5, (1, "x"), {3, 4}, frozenset({b"y"})],
    "t": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "n": np.arange(3, dtype=">i2"),
    "s": np.float16(2.0),
    "m": {"dtype": torch.bfloat16, "size": torch.Size([2]), "dev": torch.device("cuda", 0)},
    "c": 1 - 2j,
    "b": bytearray(b"z"),
}


def test_every_truncation_is_a_format_error() -> None:
    data = encode_value(SAMPLE, key="k")
    for end in range(len(data)):
        with pytest.raises(CheckpointFormatError, match="'k'"):
            decode_value(data[:end], key="k")


def test_trailing_garbage_is_a_format_error() -> None:
    data = encode_value(SAMPLE, key="k")
    for extra in (b"\x00", b"\xc0", data):
        with pytest.raises(CheckpointFormatError, match="'k'"):
            decode_value(data + extra, key="k")


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_corrupted_encodings_never_escape(data: st.DataObject) -> None:
    encoded = bytearray(encode_value(SAMPLE, key="fuzz"))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    decode_or_format_error(bytes(encoded))


def test_accepts_bytearray_and_memoryview() -> None:
    data = encode_value(SAMPLE, key="k")
    assert_same(SAMPLE, decode_value(bytearray(data), key="k"))
    assert_same(SAMPLE, decode_value(memoryview(data), key="k"))


TENSOR_OK = ["float32", [2], b"\x00" * 8]
NDARRAY_OK = ["<f4", [2], b"\x00" * 8]

MALFORMED: dict[str, object] = {
    "unknown ext 0": ext(0, b""),
    "unknown ext 16": ext(16, b""),
    "unknown ext 127": ext(127, b"x"),
    "negative ext": raw_ext(-5, b""),
    "timestamp": raw_ext(-1, b"\x00\x00\x00\x01"),
    "empty bigint": ext(EXT_BIGINT, b""),
    "short complex": ext(EXT_COMPLEX, b"\x00" * 15),
    "tuple not array": ext(EXT_TUPLE, {"a": 1}),
    "tuple trailing": ext(EXT_TUPLE, pack([1]) + b"\x01"),
    "tuple garbage": ext(EXT_TUPLE, b"\xc1"),
    "list in set": ext(EXT_SET, [[1]]),
    "set dict key": {ext(EXT_SET, [1]): 0},
    "list in tuple key": {ext(EXT_TUPLE, [[1]]): 0},
    "list key": b"\x81\x91\x01\x02",
    "repeated raw key": b"\x82\xa1a\x01\xa1a\x02",
    "int and bool keys": b"\x82\x01\x01\xc3\x02",
    "repeated key": {ext(EXT_TUPLE, [1]): 0, ext(EXT_TUPLE, [1.0]): 1},
    "size of floats": ext(EXT_TORCH_SIZE, [1.5]),
    "size of bools": ext(EXT_TORCH_SIZE, [True]),
    "size too big": ext(EXT_TORCH_SIZE, [2**63]),
    "dtype alias": ext(EXT_TORCH_DTYPE, b"float"),
    "dtype attribute": ext(EXT_TORCH_DTYPE, b"__import__"),
    "dtype quantized": ext(EXT_TORCH_DTYPE, b"qint8"),
    "dtype not utf-8": ext(EXT_TORCH_DTYPE, b"\xff"),
    "device bogus": ext(EXT_TORCH_DEVICE, ["nonsense", None]),
    "device negative": ext(EXT_TORCH_DEVICE, ["cuda", -1]),
    "device arity": ext(EXT_TORCH_DEVICE, ["cpu"]),
    "device type int": ext(EXT_TORCH_DEVICE, [1, None]),
    "tensor arity": ext(EXT_TORCH_TENSOR, TENSOR_OK[:2]),
    "tensor bogus dtype": ext(EXT_TORCH_TENSOR, ["os.system", [2], b"\x00" * 8]),
    "tensor dtype not str": ext(EXT_TORCH_TENSOR, [5, [2], b"\x00" * 8]),
    "tensor too few bytes": ext(EXT_TORCH_TENSOR, ["float32", [3], b"\x00" * 8]),
    "tensor too many bytes": ext(EXT_TORCH_TENSOR, ["float32", [1], b"\x00" * 8]),
    "tensor negative dim": ext(EXT_TORCH_TENSOR, ["float32", [-2], b"\x00" * 8]),
    "tensor float dim": ext(EXT_TORCH_TENSOR, ["float32", [2.0], b"\x00" * 8]),
    "tensor bool dim": ext(EXT_TORCH_TENSOR, ["uint8", [True], b"\x00"]),
    "tensor shape not list": ext(EXT_TORCH_TENSOR, ["float32", 2, b"\x00" * 8]),
    "tensor data str": ext(EXT_TORCH_TENSOR, ["uint8", [1], "a"]),
    "tensor huge": ext(EXT_TORCH_TENSOR, ["uint8", [2**40] * 3, b""]),
    "tensor bad bool": ext(EXT_TORCH_TENSOR, ["bool", [2], b"\x01\x02"]),
    "array object": ext(EXT_NUMPY_ARRAY, ["|O", [1], b"\x00" * 8]),
    "array longdouble": ext(EXT_NUMPY_ARRAY, ["<f16", [1], b"\x00" * 16]),
    "array structured": ext(EXT_NUMPY_ARRAY, ["|V8", [1], b"\x00" * 8]),
    "array datetime": ext(EXT_NUMPY_ARRAY, ["<M8[ns]", [1], b"\x00" * 8]),
    "array native order": ext(EXT_NUMPY_ARRAY, ["=f4", [2], b"\x00" * 8]),
    "array mismatch": ext(EXT_NUMPY_ARRAY, ["<f4", [3], b"\x00" * 8]),
    "array negative dim": ext(EXT_NUMPY_ARRAY, ["<f4", [-2], b"\x00" * 8]),
    "array too many dims": ext(EXT_NUMPY_ARRAY, ["|u1", [1] * 100, b"\x00"]),
    "array bad bool": ext(EXT_NUMPY_ARRAY, ["|b1", [1], b"\x07"]),
    "scalar size": ext(EXT_NUMPY_SCALAR, ["<f4", b"\x00" * 8]),
    "scalar dtype": ext(EXT_NUMPY_SCALAR, ["|O", b"\x00" * 8]),
    "scalar bad bool": ext(EXT_NUMPY_SCALAR, ["|b1", b"\x02"]),
    "pickle arity": ext(EXT_PICKLE, ["x"]),
    "pickle not bin": ext(EXT_PICKLE, ["x", "not bytes"]),
    "deep raw arrays": b"\x91" * 5000 + b"\xc0",
}


@pytest.mark.parametrize("tree", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_inputs_are_format_errors(tree: object) -> None:
    data = tree if isinstance(tree, bytes) else pack(tree)
    with pytest.raises(CheckpointFormatError, match=r"^key 'bad'"):
        decode_value(data, key="bad")


@pytest.mark.parametrize(
    "tree",
    [tree for tree in MALFORMED.values() if not isinstance(tree, bytes)],
    ids=[name for name, tree in MALFORMED.items() if not isinstance(tree, bytes)],
)
def test_malformed_parts_are_format_errors_naming_their_path(tree: object) -> None:
    with pytest.raises(CheckpointFormatError, match=r"^key 'bad' at \[1\]\[0\]"):
        decode_value(pack([None, ext(EXT_TUPLE, [tree])]), key="bad")


def test_bogus_dtype_name_is_named_in_the_error() -> None:
    with pytest.raises(CheckpointFormatError, match=r"'os\.system'"):
        decode_value(pack(ext(EXT_TORCH_TENSOR, ["os.system", [2], b"\x00" * 8])), key="k")


def test_deep_extension_nesting_is_a_format_error() -> None:
    tree: object = 0
    for _ in range(MAX_DEPTH + 5):
        tree = ext(EXT_TUPLE, [tree])
    with pytest.raises(CheckpointFormatError, match="nested more than"):
        decode_value(pack(tree), key="k")


def test_bytes_io_round_trips_as_a_fresh_buffer_at_position_zero(tmp_path: Path) -> None:
    """torchtitan's TrainState saves BytesIO values; DCP keeps the whole buffer."""
    buffer = io.BytesIO(b"step=42")
    buffer.seek(3)  # not at the start: the whole buffer is saved anyway
    saved = {"train_state": {"step": buffer, "more": [io.BytesIO(b"")]}}
    distcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    fresh: dict[str, Any] = {"train_state": {"step": None, "more": None}}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    step = fresh["train_state"]["step"]
    assert type(step) is io.BytesIO and step.tell() == 0 and step.read() == b"step=42"
    (empty,) = fresh["train_state"]["more"]
    assert type(empty) is io.BytesIO and empty.getvalue() == b""
    assert buffer.tell() == 3  # saving did not move the caller's buffer
