"""Staging: a snapshot of the items one rank writes, in reusable host memory.

``async_save`` plans the save first, then stages exactly the items of this
rank's final plan (a replicated tensor another rank writes is not copied here),
each through ``planner.resolve_data``, into one host **arena**; the background
write then reads the snapshot while training changes its tensors.

The arena is one allocation carved into 64-byte-aligned slots, kept and reused
by the next save whose items fit in it, so repeated saves allocate nothing (an
arena much larger than a save needs is replaced, so memory is not held). It
is pinned memory when a staged tensor is on CUDA (copied asynchronously,
synchronised once), and a ``memfd`` shared with the writer process when the
save is persisted by one (:mod:`distcp.writer_process`).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

from distcp import knobs
from distcp.errors import CheckpointError
from distcp.metadata import STATE_DICT_TYPE, Metadata, MetadataIndex
from distcp.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

__all__ = ["Arena", "StagedPlanner", "StagedSave", "StagingBuffers", "TensorSlot"]


@dataclass(frozen=True)
class TensorSlot:
    """Where a staged tensor lies in the arena: enough to rebuild the view in
    another process that maps the same memory."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize

    def view(self, arena: torch.Tensor) -> torch.Tensor:
        return arena[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class StagedSave:
    """One save's snapshot: tensor items as slots of the arena, values as bytes."""

    slots: dict[MetadataIndex, TensorSlot]
    values: dict[MetadataIndex, bytes]


class Arena:
    """One block of host memory: plain, pinned, or a shareable ``memfd``."""

    def __init__(self, size: int, *, pinned: bool, shared: bool) -> None:
        self.size, self.pinned, self.shared = size, pinned, shared
        self.fd: int | None = None
        self._mapping: mmap.mmap | None = None
        if shared:
            if not hasattr(os, "memfd_create"):
                raise CheckpointError(
                    "AsyncCheckpointerType.PROCESS needs memfd_create (Linux) to share the "
                    "staged state with the writer process; use AsyncCheckpointerType.THREAD"
                )
            self.fd = os.memfd_create("distcp-staging", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, max(size, 1))
            self._mapping = mmap.mmap(self.fd, max(size, 1))
            self.memory = torch.frombuffer(self._mapping, dtype=torch.uint8)[:size]
        else:
            self.memory = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)

    def close(self) -> None:
        del self.memory
        if self._mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self._mapping.close()
        if self.fd is not None:
            os.close(self.fd)


class StagingBuffers:
    """The arena of one async saver, reused across saves.

    Args:
        shared: stage into memory another process can map (for the writer process).
    """

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared
        self.arena: Arena | None = None
        self.allocations = 0  # arenas ever allocated (a reuse check for tests)
        self.staged_bytes = 0  # bytes copied by the last stage()

    def stage(self, plan: SavePlan, planner: SavePlanner, after: Any = None) -> StagedSave:
        """Copy every item of ``plan`` (as ``planner.resolve_data`` gives it) into
        the arena, growing it first if the items do not fit.

        ``after``: the CUDA stream whose queued work the copies must follow,
        when staging runs on another thread than the caller's (background
        staging); the device-to-host copies then run on a side stream."""
        tensors: list[tuple[MetadataIndex, torch.Tensor]] = []
        values: dict[MetadataIndex, bytes] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                if isinstance(data, torch.Tensor):
                    raise CheckpointError(
                        f"key {item.index.fqn!r}: resolve_data returned a tensor for a BYTE_IO item"
                    )
                values[item.index] = bytes(data.getbuffer())
            elif isinstance(data, torch.Tensor):
                tensors.append((item.index, data.detach()))
            else:
                raise CheckpointError(
                    f"key {item.index.fqn!r}: resolve_data returned {type(data).__name__} "
                    "for a tensor item"
                )
        slots: dict[MetadataIndex, TensorSlot] = {}
        end = 0
        for index, tensor in tensors:
            end += -end % knobs.CHUNK_ALIGNMENT
            slots[index] = TensorSlot(end, tensor.dtype, tuple(tensor.shape))
            end += slots[index].nbytes
        on_cuda = any(tensor.is_cuda for _, tensor in tensors)
        arena = self._arena(end, pinned=on_cuda and not self.shared)
        side = None
        if on_cuda and after is not None:
            side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        if side is not None:
            side.wait_stream(after)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for index, tensor in tensors:
                source = tensor.resolve_conj().resolve_neg()
                slots[index].view(arena.memory).copy_(source, non_blocking=source.is_cuda)
        if side is not None:
            side.synchronize()
        elif on_cuda:
            torch.cuda.synchronize()
        self.staged_bytes = sum(slot.nbytes for slot in slots.values())
        return StagedSave(slots, values)

    def _arena(self, size: int, *, pinned: bool) -> Arena:
        arena = self.arena
        fits = arena is not None and size <= arena.size and arena.size <= 2 * size + (64 << 20)
        if arena is not None and fits and (arena.pinned or not pinned):
            return arena
        if arena is not None:
            arena.close()
            self.arena = None
        self.allocations += 1
        self.arena = Arena(size, pinned=pinned and torch.cuda.is_available(), shared=self.shared)
        return self.arena


class StagedPlanner(SavePlanner):
    """Stands in for the caller's planner while a staged save is written: the
    storage writer's ``resolve_data`` gets the snapshot, not the live state."""

    def __init__(self, staged: StagedSave, arena: torch.Tensor) -> None:
        self.staged, self.arena = staged, arena

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        index = write_item.index
        if index in self.staged.values:
            return io.BytesIO(self.staged.values[index])
        return self.staged.slots[index].view(self.arena)

    def set_up_planner(
        self, state_dict: STATE_DICT_TYPE, storage_meta: Any = None, is_coordinator: bool = False
    ) -> None:
        raise _planned_already()

    def create_local_plan(self) -> SavePlan:
        raise _planned_already()

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        raise _planned_already()

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        raise _planned_already()


def _planned_already() -> CheckpointError:
    return CheckpointError(
        "a staged async save was planned before staging; only resolve_data is available "
        "while it is written"
    )
