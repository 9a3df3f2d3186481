"""Param groups named by FQN, and matching them between a state dict and an optimizer.

An optimizer numbers its parameters by position; a state dict that reshards
names them by FQN. A param group of the optimizer takes its hyper-parameters
from the saved group that holds the same FQNs, whatever the order of groups.
"""

from __future__ import annotations

from typing import Any

import torch

from distcp.errors import CheckpointError, KeyMismatchError

__all__ = ["group_fqns", "matching_hyper_parameters"]

#: Keys of a param group that are not hyper-parameters.
NOT_HYPER_PARAMETERS = ("params", "param_names")


def group_fqns(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    """The FQNs of each param group's parameters, in the optimizer's order.

    ``names`` maps ``id(parameter)`` to its FQN; a parameter not in it raises
    :class:`CheckpointError`."""
    groups = []
    for number, group in enumerate(optimizer.param_groups):
        fqns = []
        for parameter in group["params"]:
            name = names.get(id(parameter))
            if name is None:
                raise CheckpointError(
                    f"optimizer param group {number} holds a parameter of shape "
                    f"{list(parameter.shape)} that is not a parameter of the model; build the "
                    "optimizer from the model's parameters"
                )
            fqns.append(name)
        groups.append(fqns)
    return groups


def matching_hyper_parameters(
    optimizer: torch.optim.Optimizer,
    fqns_per_group: list[list[str]],
    saved_groups: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """For each param group of ``optimizer``, the hyper-parameters of the saved
    group holding its parameters (its own, for a group without parameters).

    Raises :class:`KeyMismatchError` naming the FQNs of a group that no saved
    group holds, and :class:`CheckpointError` for a group whose parameters were
    saved in different groups."""
    saved_group_of = {fqn: i for i, saved in enumerate(saved_groups) for fqn in saved["params"]}
    result = []
    for number, (group, fqns) in enumerate(
        zip(optimizer.param_groups, fqns_per_group, strict=True)
    ):
        found = sorted({saved_group_of[fqn] for fqn in fqns if fqn in saved_group_of})
        if len(found) > 1:
            raise CheckpointError(
                f"optimizer param group {number} holds parameters that the state dict puts in "
                f"different param groups ({found}); build the optimizer with the same grouping"
            )
        if not found and fqns:
            raise KeyMismatchError(
                fqns,
                hint=f"optimizer param group {number}: none of its parameters is in the state "
                "dict's param_groups",
            )
        source = saved_groups[found[0]] if found else group
        result.append({k: v for k, v in source.items() if k not in NOT_HYPER_PARAMETERS})
    return result
