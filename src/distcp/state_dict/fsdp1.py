"""FSDP1 (``FullyShardedDataParallel``): its state dicts through its own public
API, in the SHARDED form (a ShardedTensor per parameter, chunked along dim 0,
keyed by clean FQNs), whatever ``use_orig_params`` is.

FSDP1 flattens parameters into flat parameters sharded in 1-D; only FSDP can
turn those (and the optimizer state of them) into per-parameter tensors, so the
model and optimizer state of an FSDP1 model go through ``state_dict()`` /
``FSDP.optim_state_dict`` under ``StateDictType.SHARDED_STATE_DICT``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import (
    FullyShardedDataParallel,
    ShardedOptimStateDictConfig,
    ShardedStateDictConfig,
    StateDictType,
)

__all__ = [
    "FLAT_PARAMETER",
    "load_optimizer_state",
    "optimizer_state",
    "sharded_state_dict_type",
    "uses_fsdp1",
]


#: The name FSDP1 gives its flat parameters (``use_orig_params=False``).
FLAT_PARAMETER = "_flat_param"


def uses_fsdp1(model: nn.Module) -> bool:
    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


@contextlib.contextmanager
def sharded_state_dict_type(model: nn.Module) -> Iterator[None]:
    """Inside, FSDP1 modules of ``model`` give and take SHARDED state dicts
    (nothing happens for a model without FSDP1)."""
    if not uses_fsdp1(model):
        yield
        return
    with warnings.catch_warnings():
        # FSDP1 warns that state_dict_type is deprecated in favour of DCP's
        # get_state_dict, which is what this package provides.
        warnings.simplefilter("ignore", FutureWarning)
        with FullyShardedDataParallel.state_dict_type(
            model,
            StateDictType.SHARDED_STATE_DICT,
            ShardedStateDictConfig(),
            ShardedOptimStateDictConfig(),
        ):
            yield


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``
    with ShardedTensor state (a collective)."""
    with sharded_state_dict_type(model):
        state: dict[str, Any] = FullyShardedDataParallel.optim_state_dict(model, optimizer)
    return state


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load an FQN-keyed optimizer state dict (ShardedTensor state) (a collective)."""
    with sharded_state_dict_type(model):
        local = FullyShardedDataParallel.optim_state_dict_to_load(model, optimizer, dict(state))
    optimizer.load_state_dict(local)
