"""The model's state dict keyed by clean FQNs, and setting it back.

The local (sharded) form is what the model holds: plain tensors for plain and
DDP modules, DTensors for FSDP2 and tensor parallel, ShardedTensors for FSDP1.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from distcp.errors import KeyMismatchError, ShapeMismatchError
from distcp.state_dict.broadcast import broadcast_from_rank0
from distcp.state_dict.fqn import clean_fqn, submodule_prefixes, under_prefixes
from distcp.state_dict.fsdp1 import sharded_state_dict_type
from distcp.state_dict.full_tensors import global_shape, is_sharded, shard_like
from distcp.state_dict.gather import returned_form
from distcp.state_dict.options import StateDictOptions
from distcp.state_dict.tree import Path

__all__ = ["IncompatibleKeys", "get_model_state", "local_model_state", "set_model_state"]


class IncompatibleKeys(NamedTuple):
    """What ``set_model_state_dict`` did not match, as ``load_state_dict`` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def local_model_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    """``(state, raw_keys)``: the model's state dict in its local form, keyed by
    clean FQN, and the key ``model.load_state_dict`` wants for each clean FQN."""
    with sharded_state_dict_type(model):
        raw_state = model.state_dict()
    state: dict[str, Any] = {}
    raw_keys: dict[str, str] = {}
    for raw, value in raw_state.items():
        fqn = clean_fqn(model, raw)
        state[fqn] = value
        raw_keys[fqn] = raw
    return state, raw_keys


def get_model_state(
    model: nn.Module, submodules: Iterable[nn.Module] | None, options: StateDictOptions
) -> dict[str, Any]:
    state, _ = local_model_state(model)
    if options.ignore_frozen_params:
        frozen = frozen_parameters(model)
        state = {key: value for key, value in state.items() if key not in frozen}
    if submodules is not None:
        state = _select(state, submodule_prefixes(model, submodules), options)
    result: dict[str, Any] = returned_form(state, options)
    return result


def frozen_parameters(model: nn.Module) -> set[str]:
    return {
        clean_fqn(model, raw)
        for raw, parameter in model.named_parameters(remove_duplicate=False)
        if not parameter.requires_grad
    }


def _select(
    state: dict[str, Any], prefixes: list[str], options: StateDictOptions
) -> dict[str, Any]:
    selected = {}
    for key, value in state.items():
        prefix = under_prefixes(key, prefixes)
        if prefix is not None:
            selected[key if options.keep_submodule_prefixes else key[len(prefix) :]] = value
    return selected


def set_model_state(
    model: nn.Module, state_dict: dict[str, Any], options: StateDictOptions
) -> IncompatibleKeys:
    target, raw_keys = local_model_state(model)
    if options.broadcast_from_rank0:

        def keep(path: Path, full: torch.Tensor) -> Any:
            like = target.get(path[0]) if len(path) == 1 else None
            return shard_like(str(path[0]), full, like) if isinstance(like, torch.Tensor) else full

        state_dict = broadcast_from_rank0(state_dict, keep, what="model state dict")
    optional = frozen_parameters(model) if options.ignore_frozen_params else set()
    missing = [key for key in target if key not in state_dict and key not in optional]
    unexpected = [key for key in state_dict if key not in target]
    if options.strict and (missing or unexpected):
        raise KeyMismatchError(
            missing,
            unexpected,
            hint="The model state dict does not match the model's keys (clean FQNs, without "
            "wrapper prefixes); pass StateDictOptions(strict=False) to set a subset",
        )
    local = {
        raw_keys[key]: _as_local(key, value, target[key])
        for key, value in state_dict.items()
        if key in target
    }
    with sharded_state_dict_type(model):
        model.load_state_dict(local, strict=False)
    return IncompatibleKeys(missing, unexpected)


def _as_local(key: str, value: Any, like: Any) -> Any:
    """``value`` in the layout of the model's own ``like``: a full tensor for a
    sharded parameter is cut to this rank's shard; a DTensor on the same mesh
    with other placements is redistributed."""
    if not (isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor)):
        return value
    if global_shape(value) != global_shape(like):
        raise ShapeMismatchError(
            f"key {key!r}: the state dict has shape {list(global_shape(value))}, the model "
            f"expects {list(global_shape(like))}"
        )
    if is_sharded(like) and not is_sharded(value):
        return shard_like(key, value, like)
    if (
        isinstance(value, DTensor)
        and isinstance(like, DTensor)
        and value.device_mesh == like.device_mesh
        and value.placements != like.placements
    ):
        return value.redistribute(like.device_mesh, like.placements)
    return value
