"""Loading a whole checkpoint, whatever it holds, into a new nested state dict.

``distcp.load`` fills a state dict the caller built; a converter has none. The
:class:`FullStateLoadPlanner` builds it from the checkpoint's metadata: one
full tensor of the saved dtype and shape per tensor key (allocated once and
read in place, so the state is in memory once, never twice) and every value.
:func:`nest_state_dict` then puts the flat keys back into the nested containers
they were saved from, using the paths the save planner recorded.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from distcp.errors import CheckpointError, CheckpointFormatError, KeyMismatchError
from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import STATE_DICT_TYPE, Metadata

__all__ = ["FullStateLoadPlanner", "nest_state_dict"]


class FullStateLoadPlanner(DefaultLoadPlanner):
    """A load planner that loads every key of the checkpoint (or those in
    ``keys``) into a state dict it builds itself; pass ``{}`` as the state dict.

    After the load, :attr:`state_dict` holds the flat keys and
    :meth:`nested_state_dict` the containers they came from.

    Args:
        keys: load only these (flattened) keys; all when None.
        allow_pickle: load values that were saved with pickle (only for
            checkpoints you trust: unpickling runs code).
    """

    def __init__(self, keys: Collection[str] | None = None, *, allow_pickle: bool = False) -> None:
        super().__init__(flatten_state_dict=False, allow_pickle=allow_pickle)
        self.keys = None if keys is None else set(keys)

    def set_up_planner(
        self,
        state_dict: STATE_DICT_TYPE,
        metadata: Metadata | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if state_dict:
            raise ValueError(
                "FullStateLoadPlanner builds the state dict from the checkpoint: pass an empty "
                f"dict, not one with {len(state_dict)} keys"
            )
        if metadata is None:
            raise CheckpointError("FullStateLoadPlanner needs the checkpoint's metadata")
        saved = metadata.state_dict_metadata
        if self.keys is not None:
            missing = sorted(self.keys - saved.keys())
            if missing:
                raise KeyMismatchError(missing)
        # A placeholder per key: DefaultLoadPlanner allocates a full tensor for
        # a saved tensor and replaces a value with the decoded one.
        placeholders = {key: None for key in saved if self.keys is None or key in self.keys}
        super().set_up_planner(placeholders, metadata, is_coordinator)

    def nested_state_dict(self) -> dict[str, Any]:
        """The loaded keys inside the nested containers they were saved from."""
        planner_data = self.metadata.planner_data if self.metadata is not None else None
        return nest_state_dict(self.state_dict, planner_data)


def nest_state_dict(flat: Mapping[str, Any], paths: object) -> dict[str, Any]:
    """``flat``'s values placed at their saved paths (``paths``: the metadata's
    ``planner_data``, key → path); a key without a path stays a top-level key.

    A flattened path does not say whether an int step indexed a list or keyed a
    dict, so a container whose steps are exactly the ints ``0 … n-1`` comes back
    as a list (as torch DCP's unflattening makes it); any other container is a
    dict with the steps as its keys (int keys stay ints).
    """
    known: Mapping[Any, Any] = paths if isinstance(paths, Mapping) else {}
    tree = _Node()
    for key, value in flat.items():
        path = known.get(key)
        parts = _checked_path(key, path) if path else (key,)
        node = tree
        for step in parts[:-1]:
            child = node.children.setdefault(step, _Node())
            if not isinstance(child, _Node):
                raise _conflict(key, parts)
            node = child
        if parts[-1] in node.children:
            raise _conflict(key, parts)
        node.children[parts[-1]] = value
    root = tree.build()
    assert isinstance(root, dict)
    return root


class _Node:
    """A container being rebuilt: its steps (keys or indices) and children."""

    def __init__(self) -> None:
        self.children: dict[str | int, Any] = {}

    def build(self) -> dict[Any, Any] | list[Any]:
        built = {
            step: child.build() if isinstance(child, _Node) else child
            for step, child in self.children.items()
        }
        steps = list(built)
        indices = [step for step in steps if type(step) is int]
        if steps and len(indices) == len(steps) and sorted(indices) == list(range(len(steps))):
            return [built[index] for index in range(len(steps))]
        return built


def _conflict(key: str, path: tuple[str | int, ...]) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"key {key!r}: its saved path {list(path)!r} runs into another key's value or "
        "container (the saved paths disagree)"
    )


def _checked_path(key: str, path: object) -> tuple[str | int, ...]:
    """The path of ``key`` as the metadata records it, checked: it came from a file."""
    if isinstance(path, (str, bytes)) or not isinstance(path, Sequence) or not path:
        raise CheckpointFormatError(f"key {key!r}: its saved path {path!r} is not a sequence")
    parts = tuple(path)
    if not isinstance(parts[0], str) or not all(
        isinstance(part, (str, int)) and not isinstance(part, bool) for part in parts
    ):
        raise CheckpointFormatError(
            f"key {key!r}: its saved path {list(parts)!r} must start with a str and hold only "
            "str and int steps"
        )
    return parts
