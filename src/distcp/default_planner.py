"""DCP's ``default_planner`` module path: the default planners and DCP's
plan helpers, computed by distcp's planners."""

from __future__ import annotations

from typing import Any

from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import Metadata
from distcp.planner import LoadPlan, SavePlan
from distcp.save_planner import DefaultSavePlanner

__all__ = [
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "create_default_global_load_plan",
    "create_default_global_save_plan",
    "create_default_local_load_plan",
    "create_default_local_save_plan",
]


def create_default_local_save_plan(state_dict: dict[str, Any], is_coordinator: bool) -> SavePlan:
    """One write per local chunk of each tensor and per value of a flat state dict."""
    planner = DefaultSavePlanner(flatten_state_dict=False)
    planner.set_up_planner(state_dict, None, is_coordinator)
    return planner.create_local_plan()


def create_default_global_save_plan(
    all_plans: list[SavePlan], rewrite_index_hints: bool = True
) -> tuple[list[SavePlan], Metadata]:
    """Replicated items written once, and the checkpoint's metadata.
    ``rewrite_index_hints`` is accepted for DCP compatibility: distcp's index
    hints never take part in matching items."""
    return DefaultSavePlanner().create_global_plan(all_plans)


def create_default_local_load_plan(
    state_dict: dict[str, Any], metadata: Metadata, strict: bool = True
) -> LoadPlan:
    """Reads of every saved chunk overlapping each local chunk of a flat state
    dict; ``strict=False`` skips keys the checkpoint lacks."""
    planner = DefaultLoadPlanner(flatten_state_dict=False, allow_partial_load=not strict)
    planner.set_up_planner(state_dict, metadata, False)
    return planner.create_local_plan()


def create_default_global_load_plan(all_plans: list[LoadPlan]) -> list[LoadPlan]:
    """The plans as they are: loading needs no global decision."""
    return all_plans
