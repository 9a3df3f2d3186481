"""The public functions: torch DCP's ``state_dict`` API, on distcp.

Typical use, the same under every parallelism::

    model_sd, optim_sd = get_state_dict(model, optimizer)
    distcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    ...
    model_sd, optim_sd = get_state_dict(model, optimizer)   # placeholders, this layout
    distcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn

from distcp.state_dict.fqn import fqn_modifiers
from distcp.state_dict.model import IncompatibleKeys, get_model_state, set_model_state
from distcp.state_dict.optimizer import get_optimizer_state, set_optimizer_state
from distcp.state_dict.options import StateDictOptions

__all__ = [
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
]

Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer]
F = TypeVar("F", bound=Callable[..., Any])


def _with_fqn_modifiers(function: F) -> F:
    """Run ``function`` with its ``options.dsd_fqn_modifiers`` in force."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("options") or StateDictOptions()
        with fqn_modifiers(options.dsd_fqn_modifiers):
            return function(*args, **kwargs)

    return call  # type: ignore[return-value]


@_with_fqn_modifiers
def get_model_state_dict(
    model: nn.Module,
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> dict[str, Any]:
    """The model's state dict keyed by clean FQNs (no ``module.``,
    ``_fsdp_wrapped_module.``, ``_orig_mod.`` or ``_checkpoint_wrapped_module.``).

    Values keep the model's layout: plain tensors (plain module, DDP), DTensors
    (FSDP2, tensor parallel, both), ShardedTensors (FSDP1 in its SHARDED form),
    or full tensors with ``options.full_state_dict``. Every rank calls it (it may
    run collectives). ``submodules`` keeps only those modules' entries.
    """
    return get_model_state(model, submodules, options or StateDictOptions())


@_with_fqn_modifiers
def get_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> dict[str, Any]:
    """The optimizers' state, merged and keyed by parameter FQN:
    ``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``.

    State tensors have their parameter's layout. A fresh optimizer (no state, no
    gradients) first gets its state from one zero-gradient, zero-learning-rate
    step, so the result can be loaded into (as torch DCP does).
    """
    options = options or StateDictOptions()
    return get_optimizer_state(model, _as_list(optimizers), submodules, options)


@_with_fqn_modifiers
def get_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    submodules: set[nn.Module] | None = None,
    options: StateDictOptions | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(get_model_state_dict(...), get_optimizer_state_dict(...))``."""
    options = options or StateDictOptions()
    return (
        get_model_state(model, submodules, options),
        get_optimizer_state(model, _as_list(optimizers), submodules, options),
    )


@_with_fqn_modifiers
def set_model_state_dict(
    model: nn.Module,
    model_state_dict: dict[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> IncompatibleKeys:
    """Load a state dict keyed by clean FQNs into ``model``, whatever wraps it.

    Values may be in the model's layout (as :func:`get_model_state_dict` gave
    them) or full tensors, which each rank cuts to its shard. With
    ``options.broadcast_from_rank0`` only rank 0 needs the (full) state dict.
    With ``options.strict`` (the default) a missing or unexpected key raises
    :class:`distcp.KeyMismatchError` listing them; a shape that differs raises
    :class:`distcp.ShapeMismatchError` naming the key.
    """
    return set_model_state(model, model_state_dict, options or StateDictOptions())


@_with_fqn_modifiers
def set_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    optim_state_dict: dict[str, Any],
    *,
    options: StateDictOptions | None = None,
) -> None:
    """Load an FQN-keyed optimizer state dict into ``optimizers``.

    Each param group gets the hyper-parameters of the saved group holding its
    parameters; a parameter without saved state gets none. Call it before
    ``backward()`` or after ``step()``.
    """
    options = options or StateDictOptions()
    set_optimizer_state(model, _as_list(optimizers), optim_state_dict, options)


@_with_fqn_modifiers
def set_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: dict[str, Any],
    options: StateDictOptions | None = None,
) -> IncompatibleKeys:
    """:func:`set_model_state_dict` then :func:`set_optimizer_state_dict`."""
    options = options or StateDictOptions()
    incompatible = set_model_state(model, model_state_dict, options)
    set_optimizer_state(model, _as_list(optimizers), optim_state_dict, options)
    return incompatible


def _as_list(optimizers: Optimizers) -> list[torch.optim.Optimizer]:
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)
