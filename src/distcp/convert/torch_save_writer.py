"""Writing a ``torch.save`` file one tensor at a time.

``torch.save(state, f)`` needs every tensor in memory at once. The file
format does not: it is a zip archive of a pickle (``data.pkl``) that refers to
each tensor's bytes by a storage key, and one record per storage
(``data/<key>``). This writer pickles the state with a stand-in for each
tensor (its dtype and shape are all the pickle needs), then fetches each
tensor in turn and writes its bytes as its record, through the same archive
writer ``torch.save`` uses (``torch._C.PyTorchFileWriter``, which aligns
records so ``torch.load(mmap=True)`` maps them). Peak extra memory is one
tensor. The file is written under a temporary name and renamed into place.

What it writes loads with ``torch.load(path, weights_only=True)``: tensors
are rebuilt by ``torch._utils._rebuild_tensor_v3`` from untyped storages,
as ``torch.save`` itself pickles dtypes without a typed storage class.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distcp.filesystem.layout import new_save_id

__all__ = ["TensorStandIn", "write_torch_save"]


class TensorStandIn:
    """A tensor to be written later: its key, dtype and shape."""

    def __init__(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.key, self.dtype, self.shape = key, dtype, shape

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class _StorageRef:
    def __init__(self, record: str, nbytes: int) -> None:
        self.record, self.nbytes = record, nbytes


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, order: list[TensorStandIn]) -> None:
        super().__init__(file, protocol=2)
        self.order = order

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, TensorStandIn):
            return NotImplemented
        storage = _StorageRef(str(len(self.order)), obj.nbytes)
        self.order.append(obj)
        arguments: tuple[Any, ...] = (
            storage,
            0,
            torch.Size(obj.shape),
            _contiguous_strides(obj.shape),
            False,
            collections.OrderedDict(),
            obj.dtype,
        )
        return (torch._utils._rebuild_tensor_v3, arguments)

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            return ("storage", torch.UntypedStorage, obj.record, "cpu", obj.nbytes)
        return None


def write_torch_save(
    path: str | os.PathLike[str],
    state: Any,
    fetch: Callable[[str], torch.Tensor],
) -> None:
    """Write ``state`` (containers and values, with :class:`TensorStandIn`
    where the tensors go) as a ``torch.save`` file at ``path``, fetching each
    tensor by its key only when its bytes are written."""
    target = Path(path)
    order: list[TensorStandIn] = []
    buffer = io.BytesIO()
    _Pickler(buffer, order).dump(state)
    temporary = target.with_name(f".{target.name}.tmp-{new_save_id()}")
    try:
        writer = torch._C.PyTorchFileWriter(str(temporary))
        pickled = buffer.getvalue()
        writer.write_record("data.pkl", pickled, len(pickled))
        writer.write_record(".format_version", b"1", 1)
        writer.write_record("byteorder", b"little", len(b"little"))
        for number, stand_in in enumerate(order):
            tensor = fetch(stand_in.key).detach().contiguous()
            if tensor.dtype != stand_in.dtype or tuple(tensor.shape) != stand_in.shape:
                raise ValueError(
                    f"key {stand_in.key!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                    f"planned {stand_in.dtype} {stand_in.shape}"
                )
            storage = tensor.untyped_storage()
            if tensor.storage_offset() or storage.nbytes() != stand_in.nbytes:
                storage = tensor.clone().untyped_storage()  # a view into a larger buffer
            writer.write_record(f"data/{number}", storage, stand_in.nbytes)  # type: ignore[arg-type]
            del tensor, storage  # written: let it go before the next one is read
        writer.write_end_of_file()
        del writer
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)  # durable before it takes the name
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
