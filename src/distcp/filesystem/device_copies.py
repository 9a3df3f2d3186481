"""Device tensors reach the writer through pinned host buffers, one item ahead.

While a writer thread writes item ``k`` (and checksums it), the copy of item
``k + 1`` from the GPU into a pinned host buffer runs on a side CUDA stream, so
the device-to-host transfer overlaps the file write. Each thread has two
pinned buffers (written / being filled) that grow to the largest item and are
reused for every item after. CPU tensors are written straight from their own
memory and never pass through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distcp.filesystem.tensor_bytes import host_bytes

__all__ = ["PinnedStager", "StagedItem"]


@dataclass
class StagedItem:
    """An item's bytes, possibly still being copied from the device."""

    data: memoryview | None  # ready bytes (CPU tensors, values)
    pinned: torch.Tensor | None = None  # pinned bytes being filled
    event: Any = None  # a torch.cuda.Event recorded after the copy

    def ready(self) -> memoryview:
        if self.data is None:
            assert self.pinned is not None and self.event is not None
            self.event.synchronize()
            self.data = host_bytes(self.pinned)
        return self.data


class PinnedStager:
    """Two pinned buffers and a side stream for one writer thread."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._next = 0
        self._stream: Any = None
        self.copies = 0  # device tensors staged (for tests)

    def stage(self, tensor: torch.Tensor) -> StagedItem:
        """Start copying a CUDA tensor's bytes into the next pinned buffer."""
        tensor = tensor.detach()
        if not tensor.is_contiguous() or tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        slot = self._next
        self._next ^= 1
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < nbytes:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self._buffers[slot] = buffer
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=tensor.device)  # type: ignore[no-untyped-call]
        pinned = buffer[:nbytes]
        self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(self._stream):
            pinned.copy_(tensor.reshape(-1).view(torch.uint8), non_blocking=True)
            tensor.record_stream(self._stream)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        self.copies += 1
        return StagedItem(None, pinned, event)
