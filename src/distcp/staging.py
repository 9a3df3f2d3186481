"""DCP's staging module: the stagers ``async_save(..., async_stager=...)`` takes.

``AsyncStager`` (the protocol) and ``StagingOptions`` are torch DCP's own
classes, so a stager written for torch works with distcp and the reverse.

``DefaultStager`` and ``BlockingAsyncStager`` are distcp's. Passed to
:func:`distcp.async_save`, a ``DefaultStager`` selects distcp's planned staging
(only the items this rank writes, copied into one reused host arena,
:mod:`distcp.staging_arena`) with its options:

- ``use_async_staging``: the copy runs in the background and ``async_save``
  returns an ``AsyncSaveResponse`` at once; training must wait on its
  ``staging_completion`` before it next changes the parameters;
- ``use_pinned_memory``: the arena is pinned when CUDA tensors are staged, and
  with ``use_non_blocking_copy`` their device-to-host copies run on a side
  stream;
- ``use_shared_memory``: accepted (distcp's writer process maps its own shared
  arena; see ``AsyncCheckpointerType.PROCESS``).

Driven by anything else (torch's ``dcp.async_save``, another library), each
stager's ``stage(state_dict)`` returns a host copy of the state dict: plain
tensors and DTensors' local tensors copied to CPU, everything else copied.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager, StagingOptions
from torch.distributed.tensor import DTensor

from distcp.metadata import STATE_DICT_TYPE

__all__ = ["AsyncStager", "BlockingAsyncStager", "DefaultStager", "StagingOptions"]


class DefaultStager(AsyncStager):
    """Stages a state dict into host memory, in the background by default."""

    def __init__(self, config: StagingOptions = StagingOptions()) -> None:  # noqa: B008 - DCP's default
        self.config = config
        self._executor: ThreadPoolExecutor | None = None
        self._synchronize_after_execute = not config.use_async_staging

    def stage(self, state_dict: STATE_DICT_TYPE, **_: Any) -> Future[Any] | STATE_DICT_TYPE:
        """A host copy of ``state_dict``: a future of it with
        ``use_async_staging``, else the copy itself."""
        pin = self.config.use_pinned_memory and torch.cuda.is_available()
        if not self.config.use_async_staging:
            copied: STATE_DICT_TYPE = host_copy(state_dict, pin_memory=pin)
            return copied
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="distcp-stage")
        return self._executor.submit(host_copy, state_dict, pin_memory=pin)

    def synchronize_staging(self) -> None:
        """Nothing to wait for here: wait on the future ``stage`` returned."""

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class BlockingAsyncStager(AsyncStager):
    """Stages a state dict into host memory before ``async_save`` returns.

    Args:
        cache_staged_state_dict: keep the host copy and refill it on the next
            call with the same structure (saves allocating it again).
        type_check: accepted for DCP compatibility.
    """

    _synchronize_after_execute = False

    def __init__(self, cache_staged_state_dict: bool = False, type_check: bool = False) -> None:
        self.cache_staged_state_dict = cache_staged_state_dict
        self.type_check = type_check
        self.state_dict_cache: STATE_DICT_TYPE | None = None

    def stage(self, state_dict: STATE_DICT_TYPE) -> STATE_DICT_TYPE:
        if not self.cache_staged_state_dict:
            copied: STATE_DICT_TYPE = host_copy(state_dict, pin_memory=False)
            return copied
        if self.state_dict_cache is not None and _refill(self.state_dict_cache, state_dict):
            return self.state_dict_cache
        self.state_dict_cache = host_copy(state_dict, pin_memory=torch.cuda.is_available())
        return self.state_dict_cache

    def synchronize_staging(self) -> None:
        """Nothing to wait for: staging blocks."""

    def close(self) -> None:
        self.state_dict_cache = None


def host_copy(value: Any, *, pin_memory: bool) -> Any:
    """``value`` with every tensor copied to (pinned, if asked) host memory and
    every container rebuilt, so later changes to the original do not show."""
    if isinstance(value, DTensor):
        local = _host_tensor(value.to_local(), pin_memory)
        return DTensor.from_local(
            local,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return _host_tensor(value, pin_memory)
    if isinstance(value, dict):
        return {key: host_copy(child, pin_memory=pin_memory) for key, child in value.items()}
    if isinstance(value, list):
        return [host_copy(child, pin_memory=pin_memory) for child in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return tuple(host_copy(child, pin_memory=pin_memory) for child in value)
    return copy.deepcopy(value)


def _host_tensor(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    detached = tensor.detach()
    target = torch.empty_like(detached, device="cpu", pin_memory=pin_memory and detached.is_cuda)
    target.copy_(detached)
    return target


def _refill(cache: Any, value: Any) -> bool:
    """Copy ``value``'s tensors into the cached copy when the structure and
    every tensor's shape and dtype match; False (nothing changed) otherwise."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if not _match(cache, value, pairs):
        return False
    for target, source in pairs:
        target.copy_(source.detach())
    return True


def _match(cache: Any, value: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    if isinstance(value, DTensor):
        if not isinstance(cache, DTensor):
            return False
        return _match(cache.to_local(), value.to_local(), pairs)
    if isinstance(value, torch.Tensor):
        same = (
            isinstance(cache, torch.Tensor)
            and cache.shape == value.shape
            and cache.dtype == value.dtype
        )
        if same:
            pairs.append((cache, value))
        return same
    if isinstance(value, dict):
        return (
            isinstance(cache, dict)
            and cache.keys() == value.keys()
            and all(_match(cache[key], value[key], pairs) for key in value)
        )
    if isinstance(value, (list, tuple)):
        return (
            type(cache) is type(value)
            and len(cache) == len(value)
            and all(_match(c, v, pairs) for c, v in zip(cache, value, strict=True))
        )
    return False  # a value of another kind: copy afresh
