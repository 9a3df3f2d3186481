"""Pickle-free encoding of the non-tensor values of a state dict.

A checkpoint stores each non-tensor value (a step counter, a config, an RNG state,
an optimizer's ``param_groups``, a numpy array) as one byte string. Reading it back
never runs code: the bytes are msgpack, and every type msgpack lacks has an
extension type whose payload is plain data checked field by field. Pickle is used
only when the saver opts in, only for the leaves nothing below covers, and a reader
refuses it unless the loader opts in too.

Format
------
A value is one complete msgpack document, with nothing after it. Native msgpack
types carry: nil → ``None``; bool; int in [-2**63, 2**64 - 1]; float 64 (float 32 is
accepted on read) → ``float``, every bit kept (NaN payloads, -0.0, infinities);
str (UTF-8) → ``str``; bin → ``bytes``; array → ``list``; map → ``dict``, in stored
order, with keys that are any value of this format decoding to something hashable.

Everything else is an extension type. "array" and "map" in a payload mean a
complete msgpack document holding one; items inside are encoded by these same
rules, so extension types nest::

    code  Python type       payload
    1     int (big)         the int as big-endian two's complement, fewest bytes
                            (at least 1); used only outside the native int range
    2     complex           16 bytes: real, then imaginary part, each an IEEE-754
                            binary64, little-endian
    3     bytearray         the raw bytes
    4     tuple             array of the items
    5     set               array of the items, sorted by their encoded bytes
                            (so equal sets encode the same); a reader must not
                            rely on the order
    6     frozenset         as set
    7     torch.Size        array of ints (each in [-2**63, 2**63 - 1])
    8     torch.dtype       the dtype's name in UTF-8, one of the names in
                            distcp.dtypes ("float32", "bfloat16", ...)
    9     torch.device      array [type: str, index: int >= 0 or nil]
    10    torch.Tensor      array [dtype name: str, shape: array of ints >= 0,
                            data: bin]; data is the elements in C order,
                            little-endian, exactly prod(shape) * itemsize bytes;
                            bool elements are the bytes 0 and 1. Read back as a
                            fresh CPU tensor
    11    numpy.ndarray     array [dtype: str, shape: array of ints >= 0,
                            data: bin]; dtype is numpy's ``dtype.str`` and one of
                            "|b1", "|i1", "|u1", then "<" or ">" with i2 i4 i8
                            u2 u4 u8 f2 f4 f8 c8 c16; data is C order in that byte
                            order, exactly prod(shape) * itemsize bytes; bool
                            elements are the bytes 0 and 1
    12    numpy scalar      array [dtype: str as for 11, data: bin of itemsize
                            bytes]; read back as that dtype's scalar type
    13    pickled value     array [type name: str, pickle: bin]; the type name
                            ("module.QualName") is for messages only
    14    io.BytesIO        its whole buffer (getvalue()); read back at position 0
    15    registered type   array [name: str "module:qualname", kind: str, data];
                            only types registered with distcp.serialization
                            (add_safe_types) are written, and read back only
                            if registered in the reading process: kind
                            "dataclass" data is a map field name -> value,
                            "enum" the member name, "datetime" the ISO text
                            (timedelta: [days, seconds, microseconds]),
                            "path" the path's text

Codes 0 and 16-127 are unassigned, and msgpack's own negative codes (the
timestamp, -1) are not used: a reader rejects them. A reader also rejects any
payload that does not match its layout, a dict whose keys decode to an unhashable
or repeated value, bytes after the document, and nesting deeper than
:data:`MAX_DEPTH` containers.

The pickle rule: a writer emits code 13 only when the caller passed
``allow_pickle=True``, and only for a value of a type listed nowhere above (the
containers around it are still encoded as above). A reader given code 13 without
``allow_pickle=True`` raises :class:`PickleNotAllowedError` before unpickling
anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import pickle
import struct
from collections.abc import Iterable
from typing import Any, Final

import msgpack
import numpy as np
import torch

from distcp import serialization
from distcp.dtypes import dtype_from_name, dtype_name, supported_dtypes
from distcp.errors import (
    CheckpointError,
    CheckpointFormatError,
    PickleNotAllowedError,
    UnsupportedValueError,
)
from distcp.hash_spread import HashSpread

__all__ = [
    "EXT_BIGINT",
    "EXT_BYTEARRAY",
    "EXT_BYTES_IO",
    "EXT_COMPLEX",
    "EXT_FROZENSET",
    "EXT_NUMPY_ARRAY",
    "EXT_NUMPY_SCALAR",
    "EXT_PICKLE",
    "EXT_SAFE_TYPE",
    "EXT_SET",
    "EXT_TORCH_DEVICE",
    "EXT_TORCH_DTYPE",
    "EXT_TORCH_SIZE",
    "EXT_TORCH_TENSOR",
    "EXT_TUPLE",
    "MAX_DEPTH",
    "decode_value",
    "encode_value",
    "short_repr",
]

EXT_BIGINT: Final = 1
EXT_COMPLEX: Final = 2
EXT_BYTEARRAY: Final = 3
EXT_TUPLE: Final = 4
EXT_SET: Final = 5
EXT_FROZENSET: Final = 6
EXT_TORCH_SIZE: Final = 7
EXT_TORCH_DTYPE: Final = 8
EXT_TORCH_DEVICE: Final = 9
EXT_TORCH_TENSOR: Final = 10
EXT_NUMPY_ARRAY: Final = 11
EXT_NUMPY_SCALAR: Final = 12
EXT_PICKLE: Final = 13
EXT_BYTES_IO: Final = 14
EXT_SAFE_TYPE: Final = 15

MAX_DEPTH: Final = 128
"""Deepest nesting of containers a value may have, so that neither side can be driven
into unbounded recursion."""

PICKLE_PROTOCOL: Final = 5

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_UINT64_MAX: Final = 2**64 - 1

_NUMPY_DTYPES: Final = frozenset(
    np.dtype(order + code).str
    for code in ("?", "i1", "u1", "i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
    for order in "<>"
)

_TORCH_DTYPES: Final = frozenset(supported_dtypes())

_SUPPORTED_TYPES: Final = (
    "None, bool, int, float, complex, str, bytes, bytearray, io.BytesIO, list, tuple, dict, set, "
    "frozenset, torch.Tensor, torch.Size, torch.dtype, torch.device, numpy arrays and "
    "scalars of bool/int/uint/float/complex dtypes"
)


def encode_value(obj: object, *, key: str, allow_pickle: bool = False) -> bytes:
    """Encode ``obj`` as bytes that :func:`decode_value` turns back into an equal value
    of the same types.

    ``key`` names the value in the state dict, for error messages. A value (or a part
    of one) of an unsupported type raises :class:`UnsupportedValueError` naming the key
    and where inside the value it sits, unless ``allow_pickle`` is set: then that part
    alone is pickled."""
    tree = _Encoder(key, allow_pickle).encode(obj, "", 0)
    return _pack(tree)


def decode_value(
    data: bytes | bytearray | memoryview, *, key: str, allow_pickle: bool = False
) -> object:
    """Decode bytes written by :func:`encode_value`, never running code from them.

    Raises :class:`CheckpointFormatError` naming ``key`` for any malformed input, and
    :class:`PickleNotAllowedError` for a pickled part unless ``allow_pickle`` is set."""
    decoder = _Decoder(key, allow_pickle)
    return decoder.decode(decoder.unpack(data, ""), "", 0)


def _pack(tree: object) -> bytes:
    packed: bytes = msgpack.packb(tree, use_bin_type=True)
    return packed


def _type_name(obj: object) -> str:
    kind = type(obj)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def short_repr(obj: object, limit: int = 40) -> str:
    """``repr(obj)`` cut to ``limit`` characters, for messages; never raises
    (an int of more digits than ``str()`` converts has no repr)."""
    if type(obj) is int and obj.bit_length() > 256:
        return f"<int of {obj.bit_length()} bits>"
    try:
        text = repr(obj)
    except Exception:
        return f"<{_type_name(obj)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(key: str, path: str) -> str:
    return f"key {key!r} at {path}" if path else f"key {key!r}"


class _Encoder:
    """Turns a value into a tree of msgpack-native values and ``msgpack.ExtType``s,
    tracking the path to each part for error messages."""

    def __init__(self, key: str, allow_pickle: bool) -> None:
        self.key = key
        self.allow_pickle = allow_pickle

    def encode(self, obj: object, path: str, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(
                f"{_where(self.key, path)}: value nested more than {MAX_DEPTH} containers deep"
            )
        if obj is None or type(obj) in (bool, float, bytes):
            return obj
        if type(obj) is int:
            if _INT64_MIN <= obj <= _UINT64_MAX:
                return obj
            size = (obj.bit_length() + 8) // 8
            return msgpack.ExtType(EXT_BIGINT, obj.to_bytes(size, "big", signed=True))
        if type(obj) is str:
            return self._str(obj, path)
        if type(obj) is list:
            return self._items(obj, path, depth)
        if type(obj) is tuple:
            return msgpack.ExtType(EXT_TUPLE, _pack(self._items(obj, path, depth)))
        if type(obj) is dict:
            return self._dict(obj, path, depth)
        if type(obj) is set or type(obj) is frozenset:
            return self._set(obj, path, depth)
        if type(obj) is complex:
            return msgpack.ExtType(EXT_COMPLEX, struct.pack("<dd", obj.real, obj.imag))
        if type(obj) is bytearray:
            return msgpack.ExtType(EXT_BYTEARRAY, bytes(obj))
        if type(obj) is io.BytesIO:  # its whole buffer, as torch.save keeps it
            return msgpack.ExtType(EXT_BYTES_IO, obj.getvalue())
        if type(obj) is torch.Size:
            return msgpack.ExtType(EXT_TORCH_SIZE, _pack(list(obj)))
        if isinstance(obj, torch.dtype):
            if obj in _TORCH_DTYPES:
                return msgpack.ExtType(EXT_TORCH_DTYPE, dtype_name(obj).encode())
            return self._unsupported(obj, path, f"the dtype {obj}")
        if isinstance(obj, torch.device):
            return msgpack.ExtType(EXT_TORCH_DEVICE, _pack([obj.type, obj.index]))
        if type(obj) is torch.Tensor:
            return self._tensor(obj, path)
        if type(obj) is np.ndarray:
            return self._ndarray(obj, path)
        if isinstance(obj, np.generic):
            return self._numpy_scalar(obj, path)
        if serialization.registered(type(obj)):
            return self._safe_type(obj, path, depth)
        return self._unsupported(obj, path, f"a value of type {_type_name(obj)}")

    def _safe_type(self, obj: object, path: str, depth: int) -> object:
        """A value of a registered type: ``[name, kind, data]`` (docs/format.md)."""
        cls = type(obj)
        kind = serialization.kind_of(cls)
        data: object
        if kind == "dataclass":
            data = {
                field.name: self.encode(getattr(obj, field.name), f"{path}.{field.name}", depth + 1)
                for field in dataclasses.fields(obj)  # type: ignore[arg-type]
            }
        elif kind == "enum":
            data = obj.name  # type: ignore[attr-defined]
        elif isinstance(obj, datetime.timedelta):
            data = [obj.days, obj.seconds, obj.microseconds]
        elif kind == "datetime":
            data = obj.isoformat()  # type: ignore[attr-defined]
        else:
            data = str(obj)
        return msgpack.ExtType(EXT_SAFE_TYPE, _pack([serialization.type_name(cls), kind, data]))

    def _items(self, items: Iterable[object], path: str, depth: int) -> list[object]:
        return [self.encode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(items)]

    def _str(self, text: str, path: str) -> object:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return self._unsupported(text, path, "a str that is not valid UTF-8 (a lone surrogate)")
        return text

    def _dict(self, obj: dict[Any, Any], path: str, depth: int) -> dict[object, object]:
        tree: dict[object, object] = {}
        for i, (key, value) in enumerate(obj.items()):
            key_tree = self.encode(key, f"{path}<key #{i}>", depth + 1)
            tree[key_tree] = self.encode(value, f"{path}[{short_repr(key)}]", depth + 1)
        if len(tree) != len(obj):
            raise UnsupportedValueError(
                f"{_where(self.key, path)}: two dict keys have the same encoding"
            )
        return tree

    def _set(self, obj: set[Any] | frozenset[Any], path: str, depth: int) -> object:
        packed = sorted(_pack(self.encode(item, f"{path}<set item>", depth + 1)) for item in obj)
        header: bytes = msgpack.Packer().pack_array_header(len(packed))
        code = EXT_SET if type(obj) is set else EXT_FROZENSET
        return msgpack.ExtType(code, header + b"".join(packed))

    def _tensor(self, tensor: torch.Tensor, path: str) -> object:
        if tensor.layout != torch.strided:
            return self._unsupported(tensor, path, f"a tensor with layout {tensor.layout}")
        if tensor.dtype not in _TORCH_DTYPES:
            return self._unsupported(tensor, path, f"a tensor of dtype {tensor.dtype}")
        if tensor.is_meta:
            return self._unsupported(tensor, path, "a tensor on the meta device (it has no data)")
        cpu = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        data = cpu.reshape(-1).view(torch.uint8).numpy().tobytes()
        fields = [dtype_name(tensor.dtype), list(tensor.shape), data]
        return msgpack.ExtType(EXT_TORCH_TENSOR, _pack(fields))

    def _ndarray(self, array: np.ndarray[Any, Any], path: str) -> object:
        if array.dtype.str not in _NUMPY_DTYPES:
            return self._unsupported(array, path, f"a numpy array of dtype {array.dtype}")
        fields = [array.dtype.str, list(array.shape), array.tobytes()]
        return msgpack.ExtType(EXT_NUMPY_ARRAY, _pack(fields))

    def _numpy_scalar(self, scalar: np.generic, path: str) -> object:
        code = scalar.dtype.str
        if code not in _NUMPY_DTYPES or np.dtype(code).type is not type(scalar):
            return self._unsupported(scalar, path, f"a numpy scalar of type {_type_name(scalar)}")
        return msgpack.ExtType(EXT_NUMPY_SCALAR, _pack([code, scalar.tobytes()]))

    def _unsupported(self, obj: object, path: str, what: str) -> object:
        where = _where(self.key, path)
        if not self.allow_pickle:
            register = ""
            if serialization.kind_of(type(obj)) is not None:
                register = (
                    f"register {type(obj).__qualname__} with "
                    "distcp.serialization.add_safe_types (at save and load), "
                )
            raise UnsupportedValueError(
                f"{where}: cannot save {what} without pickle; {register}convert it to a "
                f"supported type ({_SUPPORTED_TYPES}) or pass DefaultSavePlanner(allow_pickle=True)"
                " — loading it will then need DefaultLoadPlanner(allow_pickle=True)"
            )
        try:
            data = pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            raise UnsupportedValueError(
                f"{where}: cannot save {what}: it does not pickle either ({exc})"
            ) from exc
        return msgpack.ExtType(EXT_PICKLE, _pack([_type_name(obj), data]))


class _MapPairs(list[tuple[object, object]]):
    """A msgpack map as its (key, value) pairs, unmerged, so that the decoder sees keys
    that would be unhashable or repeated in a dict."""


class _Decoder:
    """Turns decoded msgpack back into values, checking every field of every payload."""

    def __init__(self, key: str, allow_pickle: bool) -> None:
        self.key = key
        self.allow_pickle = allow_pickle

    def error(self, path: str, message: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{_where(self.key, path)}: malformed value: {message}")

    def unpack(self, data: bytes | bytearray | memoryview, path: str) -> object:
        try:
            return msgpack.unpackb(
                data, use_list=True, raw=False, strict_map_key=False, object_pairs_hook=_MapPairs
            )
        except Exception as exc:
            raise self.error(path, f"not valid msgpack ({type(exc).__name__}: {exc})") from exc

    def decode(self, node: object, path: str, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise self.error(path, f"nested more than {MAX_DEPTH} containers deep")
        kind = type(node)
        if node is None or kind in (bool, int, float, str, bytes):
            return node
        if isinstance(node, _MapPairs):
            return self._dict(node, path, depth)
        if isinstance(node, list):
            return self._items(node, path, depth)
        if isinstance(node, msgpack.ExtType):
            return self._ext(node.code, node.data, path, depth)
        raise self.error(path, f"unexpected msgpack value of type {kind.__name__}")

    def _items(self, items: list[object], path: str, depth: int) -> list[object]:
        return [self.decode(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(items)]

    def _add_key(self, spread: HashSpread, value: object, path: str) -> None:
        """Check ``value`` can be a dict key or set item, and that inserting it
        stays cheap (:mod:`distcp.hash_spread`), before it is inserted."""
        try:
            problem = spread.add(value)
        except TypeError:
            raise self.error(
                path, f"unhashable {type(value).__name__} as a dict key or set item"
            ) from None
        if problem is not None:
            raise self.error(path, problem)

    def _dict(self, node: _MapPairs, path: str, depth: int) -> dict[object, object]:
        result: dict[object, object] = {}
        spread = HashSpread()
        for i, (key_node, value_node) in enumerate(node):
            key_path = f"{path}<key #{i}>"
            key = self.decode(key_node, key_path, depth + 1)
            self._add_key(spread, key, key_path)
            if key in result:
                raise self.error(key_path, f"dict key {short_repr(key)} repeats")
            result[key] = self.decode(value_node, f"{path}[{short_repr(key)}]", depth + 1)
        return result

    def _ext(self, code: int, payload: bytes, path: str, depth: int) -> object:
        if code in (EXT_TUPLE, EXT_SET, EXT_FROZENSET):
            items = self._items(self._array(payload, path, None), path, depth)
            if code == EXT_TUPLE:
                return tuple(items)
            spread = HashSpread()
            for item in items:
                self._add_key(spread, item, f"{path}<set item>")
            return set(items) if code == EXT_SET else frozenset(items)
        if code == EXT_PICKLE:
            return self._pickle(payload, path)
        if code == EXT_SAFE_TYPE:
            return self._safe_type(payload, path, depth)
        try:
            return self._leaf(code, payload, path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise self.error(path, f"bad payload for extension type {code}: {exc}") from exc

    def _safe_type(self, payload: bytes, path: str, depth: int) -> object:
        fields = self._array(payload, path, 3)
        name, kind, data = fields
        if not isinstance(name, str) or not isinstance(kind, str):
            raise self.error(path, "a safe-type value needs a str name and kind")
        cls = serialization.lookup(name)
        if cls is None or serialization.kind_of(cls) != kind:
            raise UnsupportedValueError(
                f"{_where(self.key, path)}: the checkpoint holds a value of type {name!r} "
                f"({kind}), which is not registered in this process; register it with "
                "distcp.serialization.add_safe_types([...]) to load it"
            )
        try:
            return self._rebuild(cls, kind, data, path, depth)
        except CheckpointError:
            raise
        except Exception as exc:
            raise self.error(path, f"bad {kind} value for {name!r}: {exc}") from exc

    def _dataclass(self, cls: type, data: object, path: str, depth: int) -> object:
        """Built without ``__init__``/``__post_init__``: each field set directly."""
        names = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if not isinstance(data, _MapPairs):
            raise self.error(path, f"the fields of {cls.__qualname__} do not match")
        stored = [name for name, _ in data]
        if len(stored) != len(names) or set(stored) != names:
            raise self.error(path, f"the fields of {cls.__qualname__} do not match")
        obj: object = object.__new__(cls)
        for field_name, tree in data:
            value = self.decode(tree, f"{path}.{field_name}", depth + 1)
            object.__setattr__(obj, str(field_name), value)  # frozen dataclasses too
        return obj

    def _rebuild(self, cls: type, kind: str, data: object, path: str, depth: int) -> object:
        if kind == "dataclass":
            return self._dataclass(cls, data, path, depth)
        if kind == "enum":
            if not isinstance(data, str):
                raise self.error(path, "an enum member is saved by its name")
            return cls[data]  # type: ignore[index]
        if cls is datetime.timedelta:
            if not isinstance(data, list) or [type(n) for n in data] != [int, int, int]:
                raise self.error(path, "a timedelta is saved as [days, seconds, microseconds]")
            days, seconds, micros = data
            return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
        if not isinstance(data, str):
            raise self.error(path, f"a {kind} value is saved as text")
        if kind == "datetime":
            return cls.fromisoformat(data)  # type: ignore[attr-defined]
        return cls(data)

    def _leaf(self, code: int, payload: bytes, path: str) -> object:
        if code == EXT_BIGINT:
            if not payload:
                raise self.error(path, "empty big-int payload")
            return int.from_bytes(payload, "big", signed=True)
        if code == EXT_COMPLEX:
            if len(payload) != 16:
                raise self.error(path, f"complex payload of {len(payload)} bytes, not 16")
            real, imag = struct.unpack("<dd", payload)
            return complex(real, imag)
        if code == EXT_BYTEARRAY:
            return bytearray(payload)
        if code == EXT_BYTES_IO:
            return io.BytesIO(payload)  # a fresh buffer, at position 0
        if code == EXT_TORCH_SIZE:
            dims = self._array(payload, path, None)
            return torch.Size([self._int(d, path, _INT64_MIN) for d in dims])
        if code == EXT_TORCH_DTYPE:
            return self._dtype(payload.decode("utf-8"), path)
        if code == EXT_TORCH_DEVICE:
            kind, index = self._array(payload, path, 2)
            if not isinstance(kind, str):
                raise self.error(path, f"device type {kind!r} is not a str")
            if index is None:
                return torch.device(kind)
            return torch.device(kind, self._int(index, path, 0))
        if code == EXT_TORCH_TENSOR:
            return self._tensor(payload, path)
        if code == EXT_NUMPY_ARRAY:
            return self._ndarray(payload, path)
        if code == EXT_NUMPY_SCALAR:
            name, data = self._array(payload, path, 2)
            dtype = self._numpy_dtype(name, path)
            raw = self._check_data(data, dtype.itemsize, dtype.kind == "b", path)
            return np.frombuffer(raw, dtype=dtype)[0]
        raise self.error(path, f"unknown extension type code {code}")

    def _array(self, payload: bytes, path: str, length: int | None) -> list[object]:
        items = self.unpack(payload, path)
        if not isinstance(items, list):
            raise self.error(path, f"payload is a {type(items).__name__}, not an array")
        if length is not None and len(items) != length:
            raise self.error(path, f"payload array has {len(items)} items, not {length}")
        return items

    def _int(self, value: object, path: str, low: int) -> int:
        if type(value) is not int or not low <= value <= _INT64_MAX:
            raise self.error(path, f"{value!r} is not an int in [{low}, 2**63 - 1]")
        return value

    def _shape(self, value: object, path: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise self.error(path, f"shape {value!r} is not an array")
        return tuple(self._int(dim, path, 0) for dim in value)

    def _byte_size(self, shape: tuple[int, ...], itemsize: int, path: str) -> int:
        """prod(shape) * itemsize, refusing sizes past 2**63 - 1 without computing them."""
        if 0 in shape:
            return 0
        size = itemsize
        for dim in shape:
            size *= dim
            if size > _INT64_MAX:
                raise self.error(path, f"shape {list(shape)} is too large")
        return size

    def _dtype(self, name: object, path: str) -> torch.dtype:
        if not isinstance(name, str):
            raise self.error(path, f"dtype name {name!r} is not a str")
        try:
            return dtype_from_name(name)
        except CheckpointFormatError as exc:
            raise self.error(path, str(exc)) from None

    def _numpy_dtype(self, name: object, path: str) -> np.dtype[Any]:
        if not isinstance(name, str) or name not in _NUMPY_DTYPES:
            raise self.error(path, f"numpy dtype {name!r} is not one this format stores")
        return np.dtype(name)

    def _check_data(self, data: object, size: int, is_bool: bool, path: str) -> bytes:
        if not isinstance(data, bytes):
            raise self.error(path, f"data is a {type(data).__name__}, not bin")
        if len(data) != size:
            raise self.error(path, f"data is {len(data)} bytes, expected {size}")
        if is_bool and data.translate(None, b"\x00\x01"):
            raise self.error(path, "bool data holds a byte other than 0 and 1")
        return data

    def _tensor(self, payload: bytes, path: str) -> torch.Tensor:
        name, shape_node, data = self._array(payload, path, 3)
        dtype = self._dtype(name, path)
        shape = self._shape(shape_node, path)
        size = self._byte_size(shape, dtype.itemsize, path)
        raw = self._check_data(data, size, dtype == torch.bool, path)
        flat = torch.empty(size, dtype=torch.uint8)
        if size:
            flat.numpy()[:] = np.frombuffer(raw, dtype=np.uint8)
        return flat.view(dtype).reshape(shape)

    def _ndarray(self, payload: bytes, path: str) -> np.ndarray[Any, Any]:
        name, shape_node, data = self._array(payload, path, 3)
        dtype = self._numpy_dtype(name, path)
        shape = self._shape(shape_node, path)
        size = self._byte_size(shape, dtype.itemsize, path)
        raw = self._check_data(data, size, dtype.kind == "b", path)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def _pickle(self, payload: bytes, path: str) -> object:
        type_name, data = self._array(payload, path, 2)
        if not isinstance(type_name, str) or not isinstance(data, bytes):
            raise self.error(path, "pickle payload is not [str, bin]")
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"{_where(self.key, path)}: the checkpoint holds a pickled {type_name}, and "
                "unpickling runs arbitrary code. If you trust this checkpoint, load it with "
                "DefaultLoadPlanner(allow_pickle=True)"
            )
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise self.error(path, f"cannot unpickle the saved {type_name}: {exc}") from exc
