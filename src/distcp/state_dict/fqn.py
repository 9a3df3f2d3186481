"""Fully qualified names (FQNs) without the prefixes that wrappers add.

Wrapping a module adds a path component: DDP and DataParallel add ``module``,
FSDP1 adds ``_fsdp_wrapped_module``, ``torch.compile`` adds ``_orig_mod``,
activation checkpointing adds ``_checkpoint_wrapped_module``. The clean FQN is
the path of the unwrapped model (``layers.0.weight``), the same under every
parallelism, so a checkpoint saved under one loads under another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

import torch
from torch import nn

__all__ = [
    "clean_fqn",
    "clean_named_parameters",
    "fqn_modifiers",
    "parameter_fqns",
    "submodule_prefixes",
    "under_prefixes",
]

# Names only a wrapper gives to its wrapped child.
_WRAPPER_CHILDREN = frozenset({"_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module"})


# The name of the module method that lists a module's own hidden children
# (``StateDictOptions.dsd_fqn_modifiers``; DCP's default name).
_modifiers_method: ContextVar[str] = ContextVar("dsd_fqn_modifiers", default="_fqn_modifiers")


@contextlib.contextmanager
def fqn_modifiers(method_name: str) -> Iterator[None]:
    """Within the block, a module whose ``method_name()`` returns
    ``{name: hidden_attribute}`` has ``hidden_attribute`` left out of FQNs
    (DCP's ``StateDictOptions(dsd_fqn_modifiers=...)``)."""
    token = _modifiers_method.set(method_name)
    try:
        yield
    finally:
        _modifiers_method.reset(token)


def _is_wrapper_child(parent: nn.Module | None, name: str) -> bool:
    if name in _WRAPPER_CHILDREN:
        return True
    modifiers = getattr(parent, _modifiers_method.get(), None)
    if callable(modifiers):
        hidden = modifiers()
        if isinstance(hidden, dict) and name in hidden.values():
            return True
    return name == "module" and isinstance(
        parent, (nn.parallel.DistributedDataParallel, nn.DataParallel)
    )


def clean_fqn(root: nn.Module, raw: str) -> str:
    """``raw`` (a key of ``root.state_dict()`` or ``root.named_parameters()``)
    without the components that wrappers inside ``root`` added.

    Components that are no child module (an already-clean name, a parameter
    name) are kept as they are.
    """
    kept: list[str] = []
    module: nn.Module | None = root
    for part in raw.split("."):
        child = module._modules.get(part) if module is not None else None
        if child is not None and _is_wrapper_child(module, part):
            module = child
            continue
        kept.append(part)
        module = child
    return ".".join(kept)


def clean_named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter of ``model`` under its clean FQN; a parameter shared by
    several modules appears once, under the first name ``named_parameters`` gives."""
    named: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for raw, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in seen:
            seen.add(id(parameter))
            named[clean_fqn(model, raw)] = parameter
    return named


def parameter_fqns(model: nn.Module) -> dict[int, str]:
    """The clean FQN of each parameter of ``model``, by the parameter's ``id``."""
    return {id(parameter): fqn for fqn, parameter in clean_named_parameters(model).items()}


def submodule_prefixes(model: nn.Module, submodules: Iterable[nn.Module]) -> list[str]:
    """The clean FQN prefix of each given submodule of ``model`` (``"encoder."``;
    ``""`` for ``model`` itself). Raises ``ValueError`` for a module outside ``model``."""
    wanted = {id(module): module for module in submodules}
    prefixes: dict[int, str] = {}
    for raw, module in model.named_modules(remove_duplicate=False):
        if id(module) in wanted and id(module) not in prefixes:
            name = clean_fqn(model, raw)
            prefixes[id(module)] = f"{name}." if name else ""
    stray = [type(wanted[key]).__name__ for key in wanted if key not in prefixes]
    if stray:
        raise ValueError(f"submodules {stray} are not inside the model")
    return list(prefixes.values())


def under_prefixes(fqn: str, prefixes: Iterable[str]) -> str | None:
    """The first of ``prefixes`` that ``fqn`` starts with, or None."""
    for prefix in prefixes:
        if fqn.startswith(prefix):
            return prefix
    return None
