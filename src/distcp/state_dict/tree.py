"""Walking the nested containers of a state dict, leaf by leaf, in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = ["Path", "map_leaves"]

Path: TypeAlias = tuple[Any, ...]


def map_leaves(tree: Any, function: Callable[[Path, Any], Any], path: Path = ()) -> Any:
    """A copy of ``tree`` (dicts, lists and tuples rebuilt) with each leaf
    replaced by ``function(path, leaf)``. Leaves are visited in insertion order,
    which is the same on every rank for the same structure, so ``function`` may
    run collectives."""
    if isinstance(tree, dict):
        return {key: map_leaves(value, function, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, list):
        return [map_leaves(value, function, (*path, i)) for i, value in enumerate(tree)]
    if type(tree) is tuple:
        return tuple(map_leaves(value, function, (*path, i)) for i, value in enumerate(tree))
    return function(path, tree)
