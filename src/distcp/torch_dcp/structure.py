"""From the records a torch DCP ``.metadata`` unpickles to, the real
:class:`Metadata`, checked field by field before any data file is opened.

Every field gets the type torch gives it (a dtype is a ``torch.dtype``, a
chunk's offsets a ``torch.Size`` of non-negative ints, …); every chunk lies
inside its tensor, the chunks of a tensor neither overlap nor leave a gap, every
chunk and byte value has exactly one storage entry, each entry's file name is a
relative path that stays inside the checkpoint, and each chunk's stored range
is at least as long as its raw bytes (``torch.save`` only adds framing), which
also bounds what a loader may allocate for it by the file's real size.

Containers may be shared in a pickle (a memo reference); a tensor entry or a
chunk list shared between keys is refused, so checking costs time in
proportion to the file's size.
"""

from __future__ import annotations

import math
import reprlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo

from distcp.errors import CheckpointFormatError
from distcp.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.tiling import find_repeated, tiling_problem
from distcp.torch_dcp.safe_unpickle import MEM_FORMAT_KIND, Record

__all__ = ["build_metadata", "check_relative_path"]

#: Bytes a single tensor or chunk may claim: far past any real one, short of int64 overflow.
_MAX_NBYTES = 1 << 60
_MAX_DEPTH = 64
_MEMORY_FORMATS = {0: torch.contiguous_format, 1: torch.channels_last, 2: torch.preserve_format}
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes)


@dataclass
class _Context:
    source: str
    names: set[str] = field(default_factory=set)  # file names already found safe

    def fail(self, message: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"torch DCP metadata {self.source}: {message}")


#: Each record kind's known fields and, of those, the ones it must have.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "Metadata": (
        frozenset(
            {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"}
        ),
        frozenset({"state_dict_metadata"}),
    ),
    "TensorStorageMetadata": (frozenset({"properties", "size", "chunks"}),) * 2,
    "BytesStorageMetadata": (frozenset(), frozenset()),
    "ChunkStorageMetadata": (frozenset({"offsets", "sizes"}),) * 2,
    "MetadataIndex": (frozenset({"fqn", "offset", "index"}), frozenset({"fqn"})),
    "_StorageInfo": (
        frozenset({"relative_path", "offset", "length", "transform_descriptors"}),
        frozenset({"relative_path", "offset", "length"}),
    ),
}


def build_metadata(root: Any, *, source: str) -> Metadata:
    """The :class:`Metadata` described by ``root`` (what :func:`safe_loads`
    returned), or :class:`CheckpointFormatError` naming ``source`` and the key."""
    context = _Context(source)
    fields = _fields(context, root, "Metadata", "the file")
    entries = _entries(context, fields["state_dict_metadata"])
    storage = _storage(context, fields.get("storage_data"), entries)
    version = fields.get("version")
    if version is not None and not isinstance(version, str):
        raise context.fail(f"version is a {type(version).__name__}, not a string")
    return Metadata(
        state_dict_metadata=entries,
        planner_data=_plain(context, fields.get("planner_data"), "planner_data", {}, 0),
        storage_data=storage,
        storage_meta=_storage_meta(context, fields.get("storage_meta")),
        version=version,
    )


def check_relative_path(name: object, where: str, fail: Callable[[str], Exception]) -> str:
    """``name`` if it is a relative path inside the checkpoint: non-empty
    ``/``-separated parts, none of them ``.``, ``..`` or holding a backslash,
    colon or NUL (Windows separators and drives); else ``fail(message)``."""
    if not isinstance(name, str) or not name:
        raise fail(f"{where}: the file name is {name!r}, not a non-empty string")
    parts = name.split("/")
    if name.startswith("/") or any(
        part in ("", ".", "..") or any(c in part for c in "\\:\x00") for part in parts
    ):
        raise fail(
            f"{where}: the file name {name!r} is not a plain relative path inside the "
            "checkpoint (absolute, '..', or a separator or drive letter)"
        )
    return name


def _fields(
    context: _Context, value: Any, kind: str, where: str | Callable[[], str]
) -> dict[str, Any]:
    """The state of a ``kind`` record as a dict, with only its known fields
    (``where``, or what it returns, names the record in a message)."""
    if isinstance(value, Record) and value.kind == kind:
        state = value.state if value.has_state else {}
        known, required = _FIELDS[kind]
        if type(state) is dict:
            keys = state.keys()
            if keys <= known and keys >= required:
                return state
    where = where if isinstance(where, str) else where()
    if not isinstance(value, Record) or value.kind != kind:
        raise context.fail(f"{where}: expected a {kind}, found {_describe(value)}")
    if type(state) is not dict:
        raise context.fail(f"{where}: the {kind}'s state is {_describe(state)}, not its fields")
    unknown = sorted(map(repr, state.keys() - known))
    missing = sorted(required - state.keys())
    raise context.fail(
        f"{where}: the {kind} has unknown fields [{', '.join(unknown)}] / lacks {missing} "
        "(written by a torch version distcp does not know?)"
    )


def _entries(
    context: _Context, value: Any
) -> dict[str, TensorStorageMetadata | BytesStorageMetadata]:
    if not isinstance(value, dict):
        raise context.fail(f"state_dict_metadata is {_describe(value)}, not a dict")
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    seen: dict[int, str] = {}  # id of a record or chunk list -> the key it was first under
    for key, entry in value.items():
        if not isinstance(key, str):
            raise context.fail(f"state_dict_metadata has a key {_describe(key)}, not a string")
        if isinstance(entry, Record) and entry.kind == "BytesStorageMetadata":
            _fields(context, entry, "BytesStorageMetadata", lambda: f"key {key!r}")  # noqa: B023
            entries[key] = BytesStorageMetadata()
            continue
        parts = [entry]
        state = entry.state if isinstance(entry, Record) else None
        if isinstance(state, dict) and isinstance(state.get("chunks"), list):
            parts.append(state["chunks"])
        for part in parts:
            if seen.setdefault(id(part), key) != key:
                raise context.fail(
                    f"keys {seen[id(part)]!r} and {key!r} share one tensor entry or chunk list"
                )
        entries[key] = _tensor_entry(context, entry, key)
    return entries


def _tensor_entry(context: _Context, value: Any, key: str) -> TensorStorageMetadata:
    where = f"key {key!r}"
    fields = _fields(context, value, "TensorStorageMetadata", where)
    properties = _properties(context, fields["properties"], where)
    shape = _ints(context, fields["size"], f"{where} size")
    if math.prod(shape) * properties.dtype.itemsize > _MAX_NBYTES:
        raise context.fail(f"{where}: shape {list(shape)} is impossibly large")
    chunks_value = fields["chunks"]
    if not isinstance(chunks_value, list):
        raise context.fail(f"{where}: chunks is {_describe(chunks_value)}, not a list")
    chunks, all_offsets, all_sizes = [], [], []
    ndim = len(shape)
    for number, chunk in enumerate(chunks_value):
        chunk_fields = _fields(context, chunk, "ChunkStorageMetadata", _label(where, number))
        offsets = _ints(context, chunk_fields["offsets"], _label(where, number, " offsets"))
        sizes = _ints(context, chunk_fields["sizes"], _label(where, number, " sizes"))
        if len(offsets) != ndim or len(sizes) != ndim:
            raise context.fail(
                f"{where} chunk {number}: offsets {list(offsets)} / sizes {list(sizes)} do not "
                f"match the {ndim}-d shape {list(shape)}"
            )
        for offset, size, dim in zip(offsets, sizes, shape, strict=True):
            if offset + size > dim:
                raise context.fail(
                    f"{where} chunk {number}: offsets {list(offsets)} + sizes {list(sizes)} lie "
                    f"outside shape {list(shape)}"
                )
        chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        all_offsets.append(offsets)
        all_sizes.append(sizes)
    _check_tiling(context, all_offsets, all_sizes, shape, where)
    return TensorStorageMetadata(properties, torch.Size(shape), chunks)


def _label(where: str, number: int, part: str = "") -> Callable[[], str]:
    """A chunk's name for a message, made only when there is one to write."""
    return lambda: f"{where} chunk {number}{part}"


def _check_tiling(
    context: _Context,
    offsets: list[tuple[int, ...]],
    sizes: list[tuple[int, ...]],
    shape: tuple[int, ...],
    where: str,
) -> None:
    """The chunks neither overlap nor leave a gap: together they are the tensor."""
    if len(sizes) == 1 and sizes[0] == shape:
        return  # one chunk, the whole tensor (its bounds were checked)
    if find_repeated(offsets) is not None:
        raise context.fail(f"{where}: two chunks have the same offsets")
    problem = tiling_problem(offsets, sizes, shape)
    if problem is not None:
        raise context.fail(f"{where}: {problem.describe(math.prod(shape))}")


def _properties(context: _Context, value: Any, where: str) -> TensorProperties:
    if not isinstance(value, Record) or value.kind != "TensorProperties":
        raise context.fail(f"{where}: properties is {_describe(value)}, not TensorProperties")
    state = value.state
    if not isinstance(state, tuple) or len(state) != 5:
        raise context.fail(f"{where}: TensorProperties' state is {_describe(state)}")
    dtype, layout, requires_grad, memory_format, pin_memory = state
    if not isinstance(dtype, torch.dtype):
        raise context.fail(f"{where}: dtype is {_describe(dtype)}")
    if not isinstance(layout, torch.layout):
        raise context.fail(f"{where}: layout is {_describe(layout)}")
    if type(requires_grad) is not bool or type(pin_memory) is not bool:
        raise context.fail(f"{where}: requires_grad / pin_memory are not booleans")
    if not (
        isinstance(memory_format, Record)
        and memory_format.kind == MEM_FORMAT_KIND
        and memory_format.state in _MEMORY_FORMATS
    ):
        raise context.fail(f"{where}: memory format is {_describe(memory_format)}")
    return TensorProperties(
        dtype=dtype,
        layout=layout,
        requires_grad=requires_grad,
        memory_format=_MEMORY_FORMATS[memory_format.state],
        pin_memory=pin_memory,
    )


def _ints(context: _Context, value: Any, where: str | Callable[[], str]) -> tuple[int, ...]:
    """``value`` as a tuple of sizes: non-negative ints, none impossibly large."""
    if type(value) is torch.Size:  # only the unpickler's factory makes one: of plain ints
        if not value or (min(value) >= 0 and max(value) <= _MAX_NBYTES):
            return tuple(value)
    elif isinstance(value, (tuple, list)) and all(
        type(v) is int and 0 <= v <= _MAX_NBYTES for v in value
    ):
        return tuple(value)
    where = where if isinstance(where, str) else where()
    raise context.fail(f"{where} is {_describe(value)}, not a torch.Size of sizes")


def _storage(
    context: _Context,
    value: Any,
    entries: dict[str, TensorStorageMetadata | BytesStorageMetadata],
) -> dict[MetadataIndex, _StorageInfo]:
    if not isinstance(value, dict):
        raise context.fail(f"storage_data is {_describe(value)}, not a dict of storage entries")
    # (key, chunk offsets or None for a value) -> the bytes its raw data needs
    needs: dict[tuple[str, tuple[int, ...] | None], int] = {}
    for key, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            needs[(key, None)] = 0
        else:
            itemsize = entry.properties.dtype.itemsize
            for chunk in entry.chunks:
                needs[(key, tuple(chunk.offsets))] = math.prod(chunk.sizes) * itemsize
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for index_value, info_value in value.items():
        index, item = _index(context, index_value)
        need = needs.pop(item, None)
        if need is None:
            what = "two storage entries" if index in storage else "a storage entry"
            raise context.fail(f"{_where(item)}: {what} for an item the checkpoint lacks")
        info = _storage_info(context, info_value, item)
        if info.length < need:
            raise context.fail(
                f"{_where(item)}: {info.length} bytes stored in {info.relative_path} but the "
                f"chunk's raw data alone is {need} bytes"
            )
        storage[index] = info
    if needs:
        first = next(iter(needs))
        more = f" (and {len(needs) - 1} more items)" if len(needs) > 1 else ""
        raise context.fail(f"{_where(first)}: no storage entry{more}")
    return storage


def _where(item: tuple[str, tuple[int, ...] | None]) -> str:
    key, offsets = item
    return f"key {key!r}" + (f" chunk at {list(offsets)}" if offsets is not None else "")


def _index(
    context: _Context, value: Any
) -> tuple[MetadataIndex, tuple[str, tuple[int, ...] | None]]:
    """A storage key, and the ``(key, offsets)`` it names."""
    fields = _fields(context, value, "MetadataIndex", "a storage key")
    fqn, offset, hint = fields["fqn"], fields.get("offset"), fields.get("index")
    if not isinstance(fqn, str):
        raise context.fail(f"a storage key's fqn is {_describe(fqn)}")
    if hint is not None and type(hint) is not int:
        raise context.fail(f"key {fqn!r}: the storage key's index hint is {_describe(hint)}")
    if offset is None:
        return MetadataIndex(fqn, None, hint), (fqn, None)
    offsets = _ints(context, offset, lambda: f"key {fqn!r} storage offset")
    return MetadataIndex(fqn, offsets, hint), (fqn, offsets)


def _storage_info(
    context: _Context, value: Any, item: tuple[str, tuple[int, ...] | None]
) -> _StorageInfo:
    fields = _fields(context, value, "_StorageInfo", lambda: _where(item))
    path = fields["relative_path"]
    if type(path) is not str or path not in context.names:  # each distinct name checked once
        context.names.add(check_relative_path(path, _where(item), context.fail))
    offset, length = fields["offset"], fields["length"]
    if not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
        raise context.fail(f"{_where(item)}: byte range {offset!r}+{length!r} is not two sizes")
    if offset + length > _MAX_NBYTES:
        raise context.fail(f"{_where(item)}: byte range {offset}+{length} is impossibly large")
    descriptors = fields.get("transform_descriptors")
    if descriptors is not None:
        if not isinstance(descriptors, (list, tuple)) or not all(
            isinstance(d, str) for d in descriptors
        ):
            raise context.fail(f"{_where(item)}: transform_descriptors is {_describe(descriptors)}")
        descriptors = list(descriptors)
    return _StorageInfo(path, offset, length, transform_descriptors=descriptors)


def _storage_meta(context: _Context, value: Any) -> StorageMeta | None:
    if value is None:
        return None
    if not isinstance(value, Record) or value.kind != "StorageMeta":
        raise context.fail(f"storage_meta is {_describe(value)}")
    state = value.state if value.has_state else {}
    if not isinstance(state, dict):
        raise context.fail(f"storage_meta's state is {_describe(state)}")
    # Informational only: fields a newer torch adds are dropped, known ones are checked.
    strings = {}
    for name in ("checkpoint_id", "save_id", "load_id"):
        field = state.get(name)
        if field is not None and not isinstance(field, str):
            raise context.fail(f"storage_meta.{name} is {_describe(field)}")
        strings[name] = field
    modules = state.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise context.fail("storage_meta.modules is not a list of strings")
    return StorageMeta(modules=list(modules), **strings)


def _plain(context: _Context, value: Any, where: str, done: dict[int, Any], depth: int) -> Any:
    """``value`` if it is made of plain data (what torch's planners keep in
    ``planner_data``); shared parts stay shared and are checked once."""
    if isinstance(value, (*_PLAIN_LEAVES, torch.Size, torch.dtype)):
        return value
    if id(value) in done:
        if done[id(value)] is _IN_PROGRESS:
            raise context.fail(f"{where}: a container holds itself")
        return done[id(value)]
    if depth > _MAX_DEPTH:
        raise context.fail(f"{where}: nested more than {_MAX_DEPTH} deep")
    done[id(value)] = _IN_PROGRESS
    result: Any
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_plain(context, item, where, done, depth + 1) for item in value]
        result = type(value)(items) if type(value) in (list, tuple, set, frozenset) else None
    elif isinstance(value, dict) and type(value) in (dict, OrderedDict):
        result = type(value)(
            (_plain(context, k, where, done, depth + 1), _plain(context, v, where, done, depth + 1))
            for k, v in value.items()
        )
    else:
        result = None
    if result is None:
        raise context.fail(f"{where} holds {_describe(value)}, which is not plain data")
    done[id(value)] = result
    return result


_IN_PROGRESS: Any = object()


def _describe(value: Any) -> str:
    if isinstance(value, Record):
        return f"a {value.kind}"
    return f"{type(value).__name__} {_SHORT.repr(value)}"


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60
