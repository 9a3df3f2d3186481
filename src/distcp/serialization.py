"""The safe-types registry: user types the pickle-free value encoding may
save and load, in the spirit of ``torch.serialization.add_safe_globals``.

Registered kinds, each encoded without pickle (docs/format.md, value code 15):

- dataclasses: field by field, by name, each field value encoded by the same
  rules (so nesting works); rebuilt with ``object.__new__`` and the fields set
  directly, so neither ``__init__`` nor ``__post_init__`` runs on load (frozen
  dataclasses round-trip the same way);
- ``enum.Enum`` subclasses: by member name;
- ``datetime.datetime`` / ``date`` / ``time`` / ``timedelta``: by their ISO
  text (timedelta: days, seconds, microseconds);
- ``pathlib.PurePath`` subclasses: by their text.

A type is named in a checkpoint by ``module:qualname``. Loading looks that
name up in *this process's* registry only: nothing is imported, and a value of
a type not registered at load time raises ``UnsupportedValueError`` naming
the key and the type. ::

    from distcp.serialization import add_safe_types
    add_safe_types([RunConfig, Phase])        # at save and at load
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import pathlib
import threading
from collections.abc import Iterable, Iterator

__all__ = ["add_safe_types", "clear_safe_types", "get_safe_types", "safe_types", "type_name"]

_STDLIB = (datetime.datetime, datetime.date, datetime.time, datetime.timedelta)
_lock = threading.Lock()
_by_name: dict[str, type] = {}


def type_name(cls: type) -> str:
    """The name a registered type is saved under: ``module:qualname``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def kind_of(cls: type) -> str | None:
    """How a type is encoded: "dataclass", "enum", "datetime", "path"; None
    for a type the registry cannot hold."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return "enum"
    if dataclasses.is_dataclass(cls) and isinstance(cls, type):
        return "dataclass"
    if cls in _STDLIB:
        return "datetime"
    if isinstance(cls, type) and issubclass(cls, pathlib.PurePath):
        return "path"
    return None


def add_safe_types(types: Iterable[type]) -> None:
    """Allow values of ``types`` to be saved and loaded without pickle."""
    chosen = list(types)
    for cls in chosen:
        if kind_of(cls) is None:
            raise TypeError(
                f"{cls!r} cannot be a safe type: only dataclasses, Enum subclasses, "
                "datetime/date/time/timedelta and pathlib paths can"
            )
    with _lock:
        for cls in chosen:
            _by_name[type_name(cls)] = cls


def get_safe_types() -> list[type]:
    """The registered types."""
    with _lock:
        return list(_by_name.values())


def clear_safe_types() -> None:
    """Forget every registered type."""
    with _lock:
        _by_name.clear()


@contextlib.contextmanager
def safe_types(types: Iterable[type]) -> Iterator[None]:
    """Register ``types`` for the duration of the block."""
    chosen = list(types)
    with _lock:
        before = dict(_by_name)
    add_safe_types(chosen)
    try:
        yield
    finally:
        with _lock:
            _by_name.clear()
            _by_name.update(before)


def registered(cls: type) -> bool:
    """Whether values of exactly ``cls`` may be encoded."""
    with _lock:
        return _by_name.get(type_name(cls)) is cls


def lookup(name: str) -> type | None:
    """The registered type saved as ``name``, or None; never imports."""
    with _lock:
        return _by_name.get(name)
