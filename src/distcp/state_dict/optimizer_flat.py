"""The flat form of an optimizer state dict (``flatten_optimizer_state_dict``).

``{"state.<fqn>.<name>": value, "param_groups.<fqn>.<name>": value}``: every
value under its own key, so pipeline stages (or any model split) can save and
load their parts without agreeing on param group order. State and
hyper-parameter names hold no dot (``exp_avg``, ``lr``), so a key splits at its
last dot.
"""

from __future__ import annotations

from typing import Any

from distcp.errors import KeyMismatchError

__all__ = ["flatten", "is_flat", "unflatten"]

_STATE = "state."
_GROUPS = "param_groups."


def is_flat(state_dict: dict[str, Any]) -> bool:
    return bool(state_dict) and all(
        isinstance(key, str) and key.startswith((_STATE, _GROUPS)) for key in state_dict
    )


def flatten(state_dict: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for fqn, values in state_dict["state"].items():
        for name, value in values.items():
            flat[f"{_STATE}{fqn}.{name}"] = value
    for group in state_dict["param_groups"]:
        for fqn in group["params"]:
            for name, value in group.items():
                if name not in ("params", "param_names"):
                    flat[f"{_GROUPS}{fqn}.{name}"] = value
    return flat


def unflatten(flat: dict[str, Any], fqn_groups: list[list[str]]) -> dict[str, Any]:
    """The nested form, with one param group per entry of ``fqn_groups`` (the
    FQNs of each param group of the optimizers being set)."""
    state: dict[str, dict[str, Any]] = {}
    hyper: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith(_STATE):
            fqn, name = key[len(_STATE) :].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = value
        elif key.startswith(_GROUPS):
            fqn, name = key[len(_GROUPS) :].rsplit(".", 1)
            hyper.setdefault(fqn, {})[name] = value
    groups = []
    for fqns in fqn_groups:
        described = [fqn for fqn in fqns if fqn in hyper]
        if fqns and not described:
            raise KeyMismatchError(
                [f"{_GROUPS}{fqn}" for fqn in fqns],
                hint="the flat optimizer state dict has no hyper-parameters for this param group",
            )
        source = hyper[described[0]] if described else {}
        groups.append({**source, "params": list(fqns)})
    return {"state": state, "param_groups": groups}
