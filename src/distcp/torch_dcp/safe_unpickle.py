"""The restricted unpickler for torch DCP's ``.metadata`` file.

torch DCP pickles its :class:`Metadata`; ``pickle.load`` on such a file runs
whatever callable the file names, so a checkpoint from elsewhere could run any
code the moment it is loaded. This unpickler runs none:

- :meth:`SafeUnpickler.find_class` resolves only the globals torch's metadata
  pickles use (checked with ``pickletools`` against torch 2.13's
  ``dcp.save`` of plain tensors, DTensors, FSDP2 model and optimizer state,
  byte values and nested dicts). Every other global is refused, never imported.
- Even the allowed ones do not resolve to torch's classes. DCP's dataclasses
  become :class:`Record` stand-ins whose ``__new__`` takes no arguments and
  whose ``__setstate__`` only stores the state, so ``NEWOBJ``/``REDUCE``/``BUILD``
  on them run no torch code; :mod:`distcp.torch_dcp.structure` then checks each
  record's fields and builds the real classes itself. ``torch.Size``,
  ``torch.serialization._get_layout``, paths and the memory-format enum resolve
  to small factories that check their arguments. Neither the factories nor
  what they return (sizes, dtypes, strings, records) has anything a ``BUILD``
  could write into, so no process-wide object (a dtype, an enum member, a
  factory) can be altered by one load for the next.
- Persistent ids (torch.save's storage references) are refused.

:func:`distcp.torch_dcp.pickle_scan.check_opcodes` runs first, so the C
unpickler never sees an opcode that allocates what the file merely declares.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from distcp.errors import CheckpointFormatError
from distcp.torch_dcp.pickle_scan import check_opcodes

__all__ = ["ALLOWED_GLOBALS", "Record", "SafeUnpickler", "safe_loads"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

#: The DCP dataclasses a metadata pickle holds, by (module, name): each becomes a Record.
RECORD_KINDS: dict[tuple[str, str], str] = {
    (_DCP_METADATA, "Metadata"): "Metadata",
    (_DCP_METADATA, "TensorStorageMetadata"): "TensorStorageMetadata",
    (_DCP_METADATA, "BytesStorageMetadata"): "BytesStorageMetadata",
    (_DCP_METADATA, "ChunkStorageMetadata"): "ChunkStorageMetadata",
    (_DCP_METADATA, "TensorProperties"): "TensorProperties",
    (_DCP_METADATA, "MetadataIndex"): "MetadataIndex",
    (_DCP_METADATA, "StorageMeta"): "StorageMeta",
    (_DCP_FILESYSTEM, "_StorageInfo"): "_StorageInfo",
}

MEM_FORMAT_KIND = "_MEM_FORMAT_ENCODING"

_UNSET: Any = object()


class Record:
    """A stand-in for one of DCP's metadata dataclasses: its kind and the
    state the pickle gave it, nothing else. Built without arguments (``NEWOBJ``
    with none, as torch's pickles do) and given its state once (``BUILD``)."""

    __slots__ = ("state",)
    kind: ClassVar[str] = ""
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        if args or kwargs:
            raise CheckpointFormatError(
                f"a {cls.kind} is built with arguments, which torch's pickles never do"
            )
        record = super().__new__(cls)
        record.state = _UNSET
        return record

    def __setstate__(self, state: Any) -> None:
        if not isinstance(self, Record) or self.state is not _UNSET:
            raise CheckpointFormatError(f"a {self.kind} is given its state twice")
        self.state = state

    @property
    def has_state(self) -> bool:
        return self.state is not _UNSET

    def __repr__(self) -> str:
        return f"Record({self.kind})"


def _record_type(kind: str) -> type[Record]:
    return type(f"{kind}Record", (Record,), {"__slots__": (), "kind": kind})


_RECORD_TYPES: dict[str, type[Record]] = {
    kind: _record_type(kind) for kind in [*RECORD_KINDS.values(), MEM_FORMAT_KIND]
}


class _Factory:
    """A callable global that no ``BUILD`` can alter: no ``__dict__``, no slots,
    a ``__setstate__`` that refuses (a plain function's ``__defaults__`` could
    be rewritten through a ``BUILD``'s slot state)."""

    __slots__ = ()
    function: ClassVar[Callable[..., Any]]

    def __call__(self, *args: Any) -> Any:
        return type(self).function(*args)

    def __setstate__(self, state: Any) -> None:
        raise CheckpointFormatError(f"a BUILD on {type(self).__name__} is refused")


def _factory(function: Callable[..., Any]) -> _Factory:
    kind = type(
        function.__name__, (_Factory,), {"__slots__": (), "function": staticmethod(function)}
    )
    factory: _Factory = kind()
    return factory


def _size(dims: Any) -> torch.Size:
    """``torch.Size``: a tuple (or list) of plain ints, at most 64 of them."""
    if not isinstance(dims, (tuple, list)) or len(dims) > 64:
        raise CheckpointFormatError(f"a torch.Size is built from {type(dims).__name__}")
    for dim in dims:
        if type(dim) is not int:
            raise CheckpointFormatError(f"a torch.Size holds a {type(dim).__name__}")
    return torch.Size(dims)


def _mem_format(value: Any) -> Record:
    """``_MEM_FORMAT_ENCODING(value)``: a record of the code, not the enum
    member (a ``BUILD`` on a member would alter it for the whole process)."""
    if type(value) is not int:
        raise CheckpointFormatError(f"a memory-format code is a {type(value).__name__}")
    record = _RECORD_TYPES[MEM_FORMAT_KIND]()
    record.state = value
    return record


_TORCH_CONSTANTS: dict[str, object] = {
    name: value
    for name, value in vars(torch).items()
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
}
_LAYOUTS: dict[str, torch.layout] = {
    str(value): value for value in _TORCH_CONSTANTS.values() if isinstance(value, torch.layout)
}


def _layout(name: Any) -> torch.layout:
    """``torch.serialization._get_layout(name)``: a lookup, nothing imported."""
    layout = _LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise CheckpointFormatError(f"unknown torch layout {name!r}")
    return layout


def _path_factory(flavour: type[pathlib.PurePath]) -> Callable[..., str]:
    def path(*parts: Any) -> str:
        """A saved ``pathlib`` path (``StorageMeta.checkpoint_id``), as a string."""
        if not all(isinstance(part, str) for part in parts):
            raise CheckpointFormatError("a path is built from something other than strings")
        return str(flavour(*parts))

    return path


_POSIX_PATH = _factory(_path_factory(pathlib.PurePosixPath))
_WINDOWS_PATH = _factory(_path_factory(pathlib.PureWindowsPath))

#: Every global a metadata pickle may name, and what it resolves to.
_ALLOWED: dict[tuple[str, str], object] = {
    **{key: _RECORD_TYPES[kind] for key, kind in RECORD_KINDS.items()},
    (_DCP_METADATA, MEM_FORMAT_KIND): _factory(_mem_format),
    ("torch", "Size"): _factory(_size),
    ("torch.serialization", "_get_layout"): _factory(_layout),
    **{("torch", name): value for name, value in _TORCH_CONSTANTS.items()},
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    **{
        (module, name): _WINDOWS_PATH if "Windows" in name else _POSIX_PATH
        for module in ("pathlib", "pathlib._local")
        for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
    },
}


ALLOWED_GLOBALS: Mapping[tuple[str, str], object] = MappingProxyType(_ALLOWED)
"""Every ``(module, name)`` a torch DCP metadata pickle may name."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles torch DCP metadata into records, plain containers, sizes,
    dtypes and strings; refuses everything else, naming it and ``source``."""

    def __init__(self, file: io.BytesIO, *, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise CheckpointFormatError(
                f"torch DCP metadata {self.source} names the global {module}.{name}, which is "
                "not one of torch DCP's metadata types: refused, never imported or run"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointFormatError(
            f"torch DCP metadata {self.source} holds a persistent id (a torch.save storage "
            "reference): refused, nothing loaded or run"
        )


def safe_loads(data: bytes, *, source: str) -> Any:
    """Unpickle ``data`` (a ``.metadata`` file's bytes) with :class:`SafeUnpickler`
    after :func:`check_opcodes`; any failure is a :class:`CheckpointFormatError`
    naming ``source``."""
    check_opcodes(data, source=source)
    try:
        return SafeUnpickler(io.BytesIO(data), source=source).load()
    except CheckpointFormatError as exc:
        if source in str(exc):
            raise
        raise CheckpointFormatError(f"torch DCP metadata {source}: {exc}") from None
    except Exception as exc:  # malformed input: any of pickle's many error types
        raise CheckpointFormatError(
            f"torch DCP metadata {source} is not a valid metadata pickle: "
            f"{type(exc).__name__}: {exc}"
        ) from None
