"""Values that torch DCP flattened further than distcp does.

torch DCP's flattening descends into every mapping and into any list that holds
a mapping, so an optimizer's ``param_groups`` (a list of dicts, no tensors) is
saved as ``optim.param_groups.0.lr``, ``optim.param_groups.0.betas``, …, one byte
item each. distcp's flattening (``distcp.flatten``) keeps a list, or a mapping
with integer keys, that holds no tensor as one value, so distcp's planner asks
for ``optim.param_groups``, a key such a checkpoint does not have.

This module bridges the two: from the checkpoint's ``planner_data`` (torch's
planner keeps each key's path there, e.g. ``("optim", "param_groups", 0, "lr")``)
it finds every container that holds no tensor and was not saved under a key of
its own, adds a :class:`BytesStorageMetadata` entry for it, and, when a plan
reads that entry, rebuilds the container from its parts: an int in a path is a
list position, a string a mapping key (torch writes every mapping key as a
string; where the caller's current value has the key as an int, it is made an
int again). A checkpoint without usable ``planner_data`` gets no such entries
(its keys are loaded as they are).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distcp.flatten import Path, key_for
from distcp.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

__all__ = ["MergedValue", "add_merged_entries", "assemble"]


@dataclass
class MergedValue:
    """One container distcp keeps whole: the saved keys it is made of, each
    with its path below the container."""

    key: str
    parts: list[tuple[Path, str]] = field(default_factory=list)


def add_merged_entries(metadata: Metadata) -> dict[str, MergedValue]:
    """Add an entry to ``metadata.state_dict_metadata`` for every tensor-free
    container whose parts torch DCP saved separately, and return those
    containers by key."""
    paths = _saved_paths(metadata)
    if not paths:
        return {}
    entries = metadata.state_dict_metadata
    holds_tensor: set[Path] = set()
    for key, path in paths.items():
        if isinstance(entries[key], TensorStorageMetadata):
            holds_tensor.update(path[:length] for length in range(1, len(path)))
    merged: dict[str, MergedValue] = {}
    for key, path in paths.items():
        if not isinstance(entries[key], BytesStorageMetadata):
            continue
        for length in range(1, len(path)):
            prefix = path[:length]
            if prefix in holds_tensor:
                continue
            prefix_key = key_for(prefix)
            if prefix_key in entries and prefix_key not in merged:
                continue  # a key of its own in the checkpoint: left as it is
            merged.setdefault(prefix_key, MergedValue(prefix_key)).parts.append(
                (path[length:], key)
            )
    for prefix_key in merged:
        entries[prefix_key] = BytesStorageMetadata()
    return merged


def _saved_paths(metadata: Metadata) -> dict[str, Path]:
    """torch's ``planner_data`` (key → path), when it is one: keys of the
    checkpoint, each with a path of strings and ints that joined by dots is
    the key. Anything else gives ``{}``."""
    data = metadata.planner_data
    entries = metadata.state_dict_metadata
    if not isinstance(data, dict) or not all(key in entries for key in data):
        return {}
    for key, path in data.items():
        if (
            not isinstance(path, tuple)
            or not path
            or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
            or key_for(path) != key
        ):
            return {}
    return data


def assemble(parts: list[tuple[Path, Any]], template: Any) -> Any:
    """The container made of ``parts`` (each a path below it and its value):
    int path parts are list positions, string parts mapping keys, made ints
    where ``template`` (the caller's current value, if any) has them as ints."""
    root: dict[Any, Any] = {}
    for path, value in parts:
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value

    def build(node: Any, like: Any) -> Any:
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(k, int) for k in node):
            like_list = like if isinstance(like, list) else []
            length = max(max(node) + 1, _empties_after(like_list, max(node) + 1))
            return [
                build(node[i], like_list[i] if i < len(like_list) else None) if i in node else {}
                for i in range(length)  # a gap was an empty mapping: torch saves nothing for it
            ]
        like_map = like if isinstance(like, Mapping) else {}
        built = {}
        for key, child in node.items():
            original = _original_key(key, like_map)
            built[original] = build(child, like_map.get(original))
        for key, value in like_map.items():  # empty mappings, which torch saves nothing for
            if key not in built and isinstance(value, Mapping) and not value:
                built[key] = {}
        return built

    return build(root, template)


def _empties_after(template: list[Any], start: int) -> int:
    """The length ``template`` has if its entries from ``start`` on are all
    empty mappings (which torch saved nothing for), else ``start``."""
    rest = template[start:]
    if rest and all(isinstance(v, Mapping) and not v for v in rest):
        return len(template)
    return start


def _original_key(key: Any, template: Mapping[Any, Any]) -> Any:
    """``key`` as the caller's mapping has it: torch saved ``0`` as ``"0"``."""
    if isinstance(key, str) and key not in template:
        try:
            number = int(key)
        except ValueError:
            return key
        if number in template and str(number) == key:
            return number
    return key
