"""``TrainingState``: model, optimizers, step, RNG and extras as one Stateful."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from distcp.errors import CheckpointError
from distcp.state_dict import StateDictOptions, get_state_dict, set_state_dict
from distcp.stateful import Stateful
from distcp.training.rng_state import RNGState

__all__ = ["TrainingState"]


class TrainingState:
    """Everything a training job needs to continue where it stopped.

    Its state dict is ``{"model", "optim", "step", "rng", "extras": {name: ...}}``:
    model and optimizer state from :func:`distcp.state_dict.get_state_dict`
    (keyed by FQN, in the model's own layout, so it reshards), the step counter,
    every rank's RNG streams (:class:`RNGState`, unless ``rng=False``) and the
    state of each extra ``Stateful`` (a :class:`ResumableSampler`, a
    learning-rate scheduler, a data loader with ``state_dict``).

    Save and load it as one value: ``distcp.save({"app": state}, ...)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
        *,
        step: int = 0,
        extras: Mapping[str, Stateful] | None = None,
        rng: bool = True,
        options: StateDictOptions | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.step = step
        self.extras = dict(extras or {})
        self.rng = RNGState() if rng else None
        self.options = options
        for name, extra in self.extras.items():
            if not isinstance(extra, Stateful):
                raise CheckpointError(
                    f"TrainingState extra {name!r} ({type(extra).__name__}) has no "
                    "state_dict()/load_state_dict()"
                )

    def state_dict(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(self.model, self.optimizers, options=self.options)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state, "step": self.step}
        if self.rng is not None:
            state["rng"] = self.rng.state_dict()
        state["extras"] = {name: extra.state_dict() for name, extra in self.extras.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self.options,
        )
        self.step = int(state_dict["step"])
        if self.rng is not None:
            self.rng.load_state_dict(state_dict["rng"])
        for name, extra in self.extras.items():
            extra.load_state_dict(state_dict["extras"][name])
