"""What the checkpoint manager saves besides a plain state: only the trainable
parameters of a model (the frozen ones come from a base checkpoint), or only
the weights, cast to another dtype while they are written."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch
from torch import nn

from distcp.errors import KeyMismatchError
from distcp.planner import SavePlan, WriteItem, WriteItemType
from distcp.save_planner import DefaultSavePlanner

__all__ = ["CastingSavePlanner", "FrozenOnly", "TrainableOnly", "frozen_names"]


def frozen_names(module: nn.Module) -> set[str]:
    """The state-dict names of ``module``'s parameters that do not require grad."""
    return {name for name, parameter in module.named_parameters() if not parameter.requires_grad}


class TrainableOnly:
    """A module's state without its frozen parameters (buffers stay: they
    change in training); loading it leaves the frozen ones as they are."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        frozen = frozen_names(self.module)
        return {k: v for k, v in self.module.state_dict().items() if k not in frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        result = self.module.load_state_dict(state_dict, strict=False)
        missing = set(result.missing_keys) - frozen_names(self.module)
        if missing or result.unexpected_keys:
            raise KeyMismatchError(
                f"trainable-only load: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )


class FrozenOnly:
    """Only a module's frozen parameters: what a trainable-only checkpoint
    takes from its base checkpoint."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        frozen = frozen_names(self.module)
        return {k: v for k, v in self.module.state_dict().items() if k in frozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.module.load_state_dict(state_dict, strict=False)


class CastingSavePlanner(DefaultSavePlanner):
    """Saves floating-point tensors as ``dtype``: each is cast when the
    writer asks for it (one tensor's copy at a time, never the state)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        return dataclasses.replace(plan, items=[self._retyped(item) for item in plan.items])

    def _retyped(self, item: WriteItem) -> WriteItem:
        data = item.tensor_data
        if data is None or not data.properties.dtype.is_floating_point:
            return item
        properties = dataclasses.replace(data.properties, dtype=self.dtype)
        return dataclasses.replace(
            item, tensor_data=dataclasses.replace(data, properties=properties)
        )

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        data = super().resolve_data(write_item)
        if (
            write_item.type != WriteItemType.BYTE_IO
            and isinstance(data, torch.Tensor)
            and data.is_floating_point()
            and data.dtype != self.dtype
        ):
            return data.to(self.dtype)
        return data
