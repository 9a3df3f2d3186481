"""Flattening nested state dicts to dotted keys, and writing values back.

Rules (the same on save and load, so keys agree):
- a non-empty mapping whose keys are all strings is descended into;
- a non-empty mapping with integer (or mixed str/int) keys, and a list, are
  descended into when they hold a tensor somewhere (an optimizer's per-parameter
  state, a list of layers); otherwise they are one value;
- everything else (tensors, tuples, sets, scalars, empty containers) is a leaf.
A key is its path joined with ".": ``{"a": {"b": [t0, t1]}}`` gives ``a.b.0``
and ``a.b.1``. Paths keep the original keys (an int key stays an int).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, TypeAlias

import torch

from distcp.errors import UnsupportedValueError

__all__ = ["Path", "flatten_state_dict", "key_for", "set_at_path"]

Path: TypeAlias = tuple[str | int, ...]


def key_for(path: Path) -> str:
    return ".".join(str(part) for part in path)


def flatten_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Return ``(flat, paths)``: each flattened key's value and its path."""
    flat: dict[str, Any] = {}
    paths: dict[str, Path] = {}

    def visit(value: Any, path: Path) -> None:
        if path and not _descend(value):
            key = key_for(path)
            if key in flat:
                raise UnsupportedValueError(
                    f"state-dict paths {list(paths[key])} and {list(path)} both flatten to key "
                    f"{key!r}; rename one of them"
                )
            flat[key] = value
            paths[key] = path
            return
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for child_key, child in items:
            visit(child, (*path, child_key))

    visit(state_dict, ())
    return flat, paths


def _descend(value: Any) -> bool:
    if isinstance(value, Mapping):
        if not value:
            return False
        keys_are_str = all(isinstance(k, str) for k in value)
        keys_are_plain = all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value)
        return keys_are_str or (keys_are_plain and _holds_tensor(value))
    if isinstance(value, list):
        return bool(value) and _holds_tensor(value)
    return False


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_tensor(v) for v in value)
    return False


def set_at_path(root: MutableMapping[Any, Any], path: Path, value: Any) -> None:
    """Replace the value at ``path`` inside the nested containers of ``root``."""
    container: Any = root
    for part in path[:-1]:
        container = container[part]
    container[path[-1]] = value
