"""Objects that checkpoint through their own ``state_dict`` / ``load_state_dict``."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Stateful", "StatefulT"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: modules,
    optimizers, and application objects. A top-level state-dict value that is
    Stateful is saved as its ``state_dict()``; on load, its ``state_dict()`` is
    filled in place and handed back to its ``load_state_dict()``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


StatefulT = TypeVar("StatefulT", bound=Stateful)
"""DCP's type variable for a Stateful."""
