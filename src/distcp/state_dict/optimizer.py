"""Optimizer state keyed by parameter FQN, and setting it back.

``{"state": {fqn: {"step": ..., "exp_avg": ...}}, "param_groups": [{..., "params":
[fqn, ...]}]}``: each state tensor has its parameter's layout (a DTensor for an
FSDP2 / tensor-parallel parameter, a ShardedTensor under FSDP1, a plain tensor
otherwise), so the optimizer reshards with the model. Param groups are matched
by the FQNs they hold, so hyper-parameters come back to the right group whatever
the group order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distcp.errors import CheckpointError, KeyMismatchError
from distcp.state_dict import fsdp1
from distcp.state_dict.broadcast import broadcast_from_rank0
from distcp.state_dict.fqn import (
    clean_named_parameters,
    parameter_fqns,
    submodule_prefixes,
    under_prefixes,
)
from distcp.state_dict.full_tensors import global_shape, is_sharded, shard_like
from distcp.state_dict.gather import returned_form
from distcp.state_dict.model import local_model_state
from distcp.state_dict.optimizer_flat import flatten, is_flat, unflatten
from distcp.state_dict.options import StateDictOptions
from distcp.state_dict.param_groups import group_fqns, matching_hyper_parameters
from distcp.state_dict.tree import Path, map_leaves

__all__ = ["get_optimizer_state", "initialize_state", "set_optimizer_state"]

OptimizerState = dict[str, Any]


def get_optimizer_state(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    submodules: Iterable[nn.Module] | None,
    options: StateDictOptions,
) -> dict[str, Any]:
    merged: OptimizerState = {"state": {}, "param_groups": []}
    for optimizer in optimizers:
        initialize_state(optimizer)
        if fsdp1.uses_fsdp1(model):
            one = fsdp1.optimizer_state(model, optimizer)
        else:
            one = _fqn_keyed_state(optimizer, parameter_fqns(model))
        merged["state"].update(one["state"])
        merged["param_groups"].extend(one["param_groups"])
    if submodules is not None:
        merged = _select(merged, submodule_prefixes(model, submodules))
    result: dict[str, Any] = returned_form(merged, options)
    if options.flatten_optimizer_state_dict and result:
        result = flatten(result)
    return result


def initialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer (no state, no gradients) its state, so its state
    dict has a tensor for each value a checkpoint holds and can be loaded into.

    One ``step()`` with zero gradients and learning rate 0 creates the state
    without changing a parameter; the state it leaves (``step`` 1, zero moments)
    is the optimizer's real state from then on. An optimizer that has state or
    gradients is left as it is.
    """
    if optimizer.state:
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.grad is not None for p in parameters):
        return
    for parameter in parameters:
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    learning_rates = [group.get("lr") for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, learning_rates, strict=True):
            if "lr" in group:
                group["lr"] = lr
        for parameter in parameters:
            parameter.grad = None


def _fqn_keyed_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> OptimizerState:
    """``optimizer.state_dict()`` with each parameter index replaced by its FQN."""
    fqns = [fqn for group in group_fqns(optimizer, names) for fqn in group]
    raw = optimizer.state_dict()
    state = {fqn: raw["state"][index] for index, fqn in enumerate(fqns) if index in raw["state"]}
    groups = [
        {**group, "params": [fqns[index] for index in group["params"]]}
        for group in raw["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _select(merged: OptimizerState, prefixes: list[str]) -> OptimizerState:
    def inside(fqn: str) -> bool:
        return under_prefixes(fqn, prefixes) is not None

    state = {fqn: value for fqn, value in merged["state"].items() if inside(fqn)}
    groups = [
        {**group, "params": [fqn for fqn in group["params"] if inside(fqn)]}
        for group in merged["param_groups"]
    ]
    return {"state": state, "param_groups": [group for group in groups if group["params"]]}


def set_optimizer_state(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    state_dict: dict[str, Any],
    options: StateDictOptions,
) -> None:
    if not optimizers:
        return
    if options.broadcast_from_rank0:
        state_dict = broadcast_from_rank0(
            state_dict, _full_to_local(model), what="optimizer state dict"
        )
    if options.flatten_optimizer_state_dict or is_flat(state_dict):
        state_dict = unflatten(state_dict, _fqn_groups(model, optimizers))
    _check_structure(state_dict)
    if not options.broadcast_from_rank0:
        state_dict = map_leaves(state_dict, _full_to_local(model))
    names = parameter_fqns(model)
    for optimizer in optimizers:
        if fsdp1.uses_fsdp1(model):
            fsdp1.load_optimizer_state(
                model, optimizer, _in_group_order(optimizer, names, state_dict)
            )
        else:
            _load_fqn_keyed(optimizer, names, state_dict)


def _check_structure(state_dict: dict[str, Any]) -> None:
    missing = [key for key in ("state", "param_groups") if key not in state_dict]
    if missing:
        raise KeyMismatchError(
            missing,
            hint="An optimizer state dict has 'state' and 'param_groups' (or is flat, with "
            "StateDictOptions(flatten_optimizer_state_dict=True))",
        )


def _fqn_groups(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list[list[str]]:
    names = parameter_fqns(model)
    groups = [fqns for optimizer in optimizers for fqns in group_fqns(optimizer, names)]
    if any(_is_flat_parameter(fqn) for fqns in groups for fqn in fqns):
        raise CheckpointError(
            "a flat optimizer state dict names parameters by FQN, and FSDP1 with "
            "use_orig_params=False gives the optimizer flat parameters instead; wrap the "
            "model with use_orig_params=True"
        )
    return groups


def _is_flat_parameter(fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] == fsdp1.FLAT_PARAMETER


def _state_fqn(path: Path) -> str | None:
    """The parameter FQN of a state value at ``path`` (nested or flat form)."""
    if len(path) == 3 and path[0] == "state":
        return str(path[1])
    if len(path) == 1 and str(path[0]).startswith("state."):
        return str(path[0])[len("state.") :].rsplit(".", 1)[0]
    return None


def _full_to_local(model: nn.Module) -> Any:
    """``keep(path, tensor)``: a full state tensor of a sharded parameter, cut to
    this rank's shard in the parameter's layout; anything else as it is."""
    layouts: dict[str, torch.Tensor] | None = None

    def keep(path: Path, leaf: Any) -> Any:
        nonlocal layouts
        fqn = _state_fqn(path)
        if fqn is None or not isinstance(leaf, torch.Tensor) or is_sharded(leaf) or not leaf.dim():
            return leaf
        if layouts is None:  # only when a full tensor comes: FSDP1 layouts cost a collective
            layouts = _parameter_layouts(model)
        like = layouts.get(fqn)
        if like is None or global_shape(leaf) != global_shape(like):
            return leaf
        return shard_like(".".join(map(str, path)), leaf, like)

    return keep


def _parameter_layouts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's FQN and a tensor with its layout (the parameter itself,
    or under FSDP1 its ShardedTensor from the model's sharded state dict)."""
    if fsdp1.uses_fsdp1(model):
        state, _ = local_model_state(model)
        return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    return clean_named_parameters(model)


def _in_group_order(
    optimizer: torch.optim.Optimizer, names: dict[int, str], state_dict: OptimizerState
) -> OptimizerState:
    """For FSDP1, which matches param groups by position: this optimizer's
    groups, in its order, with the hyper-parameters of the saved groups holding
    the same FQNs. Flat parameters (``use_orig_params=False``) have no FQN of
    their own; their groups are left to FSDP as given."""
    fqns_per_group = group_fqns(optimizer, names)
    fqns = [fqn for group in fqns_per_group for fqn in group]
    if any(_is_flat_parameter(fqn) for fqn in fqns):
        return state_dict
    hyper = matching_hyper_parameters(optimizer, fqns_per_group, state_dict["param_groups"])
    groups = [{**saved, "params": own} for saved, own in zip(hyper, fqns_per_group, strict=True)]
    state = {fqn: state_dict["state"][fqn] for fqn in fqns if fqn in state_dict["state"]}
    return {"state": state, "param_groups": groups}


def _load_fqn_keyed(
    optimizer: torch.optim.Optimizer, names: dict[int, str], state_dict: OptimizerState
) -> None:
    """``optimizer.load_state_dict`` of the FQN-keyed state, renumbered by position."""
    fqns_per_group = group_fqns(optimizer, names)
    hyper = matching_hyper_parameters(optimizer, fqns_per_group, state_dict["param_groups"])
    state: dict[int, Any] = {}
    groups = []
    index = 0
    for group, saved, fqns in zip(optimizer.param_groups, hyper, fqns_per_group, strict=True):
        indices = list(range(index, index + len(fqns)))
        state.update(
            (i, state_dict["state"][fqn])
            for i, fqn in zip(indices, fqns, strict=True)
            if fqn in state_dict["state"]
        )
        new_group = {**saved, "params": indices}
        if "param_names" in group:  # the optimizer's own names, not the saved ones
            new_group["param_names"] = group["param_names"]
        groups.append(new_group)
        index += len(fqns)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
