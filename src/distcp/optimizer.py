"""DCP's ``optimizer`` module path: ``load_sharded_optimizer_state_dict``."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import empty as empty_sharded
from torch.distributed._shard.sharded_tensor.api import ShardedTensor
from torch.distributed.tensor import DTensor

from distcp.api import load
from distcp.metadata import STATE_DICT_TYPE, TensorStorageMetadata
from distcp.planner import LoadPlanner
from distcp.storage import StorageReader

__all__ = ["load_sharded_optimizer_state_dict"]


def load_sharded_optimizer_state_dict(
    model_state_dict: STATE_DICT_TYPE,
    optimizer_key: str,
    storage_reader: StorageReader,
    planner: LoadPlanner | None = None,
) -> STATE_DICT_TYPE:
    """Load the optimizer state saved under ``optimizer_key``, each state
    tensor laid out as its parameter is in ``model_state_dict`` (a DTensor or
    ShardedTensor parameter gets its state sharded the same way; any other
    tensor loads whole). Every rank calls it.

    Returns ``{optimizer_key: <the nested optimizer state dict>}``, as DCP does,
    ready for e.g. ``FSDP.optim_state_dict_to_load``.
    """
    metadata = storage_reader.read_metadata()
    paths: dict[str, Any] = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    prefix = f"{optimizer_key}."
    nested: dict[str, Any] = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not key.startswith(prefix):
            continue
        path = list(paths.get(key) or key.split("."))
        placeholder: Any = None
        if isinstance(entry, TensorStorageMetadata):
            placeholder = _like_parameter(key, entry, model_state_dict, prefix)
        _set_nested(nested, path, placeholder)
    storage_reader.reset()
    load(nested, storage_reader=storage_reader, planner=planner)
    return {optimizer_key: nested.get(optimizer_key, {})}


def _like_parameter(
    key: str, entry: TensorStorageMetadata, model_state_dict: STATE_DICT_TYPE, prefix: str
) -> torch.Tensor:
    """An empty tensor to load state ``key`` into: sharded as the parameter it
    belongs to (``<optim>.state.<param fqn>.<name>``) when shapes agree."""
    dtype, size = entry.properties.dtype, torch.Size(entry.size)
    rest = key[len(prefix) :]
    fqn = rest.removeprefix("state.").rpartition(".")[0]
    parameter = model_state_dict.get(fqn)
    if isinstance(parameter, DTensor) and parameter.shape == size:
        local = torch.empty(parameter.to_local().shape, dtype=dtype)
        return DTensor.from_local(
            local, parameter.device_mesh, parameter.placements, run_check=False, shape=size,
            stride=parameter.stride(),
        )  # fmt: skip
    if isinstance(parameter, ShardedTensor) and parameter.size() == size:
        return empty_sharded(parameter.sharding_spec(), *size, dtype=dtype)
    return torch.empty(size, dtype=dtype)


def _set_nested(root: dict[str, Any], path: list[Any], value: Any) -> None:
    """Put ``value`` at ``path``, creating dicts (and lists, where the next
    step is an index) on the way."""
    container: Any = root
    for part, following in itertools.pairwise(path):
        container = _child(container, part, list if isinstance(following, int) else dict)
    _put(container, path[-1], value)


def _child(container: Any, part: Any, kind: type) -> Any:
    if isinstance(container, list):
        _put(container, part, container[part] if part < len(container) else None)
        if container[part] is None:
            container[part] = kind()
        return container[part]
    return container.setdefault(part, kind())


def _put(container: Any, part: Any, value: Any) -> None:
    if isinstance(container, list):
        container.extend([None] * (part + 1 - len(container)))
    container[part] = value
