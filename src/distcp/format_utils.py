"""Converting between distcp checkpoints and ``torch.save`` files: the twin of
``torch.distributed.checkpoint.format_utils``, with its names and signatures.

- :func:`dcp_to_torch_save`: a checkpoint directory → one ``torch.save`` file of
  the full, nested state dict (full tensors, no process group).
- :func:`torch_save_to_dcp`: a ``torch.save`` file → a distcp checkpoint.
- :class:`BroadcastingTorchSaveReader` with :class:`DynamicMetaLoadPlanner`:
  ``distcp.load`` of a ``torch.save`` file on N ranks, into any sharding.

``torch.save`` files are always read with ``weights_only=True``: converting a
file never runs code from it. For a streaming conversion of a torch DCP (or
distcp) checkpoint into distcp's format, see :func:`distcp.convert.convert_to_distcp`.
"""

from __future__ import annotations

import os
from pathlib import Path

from distcp.api import save
from distcp.convert.dynamic_meta import DynamicMetaLoadPlanner
from distcp.convert.export import convert
from distcp.convert.torch_save_file import load_torch_save
from distcp.convert.torch_save_reader import BroadcastingTorchSaveReader
from distcp.errors import CheckpointExistsError, CheckpointNotFoundError

__all__ = [
    "BroadcastingTorchSaveReader",
    "DynamicMetaLoadPlanner",
    "dcp_to_torch_save",
    "torch_save_to_dcp",
]


def dcp_to_torch_save(
    dcp_checkpoint_dir: str | os.PathLike[str], torch_save_path: str | os.PathLike[str]
) -> None:
    """Write the checkpoint in ``dcp_checkpoint_dir`` as one ``torch.save`` file
    of its full state dict, nested as it was saved, with every tensor whole.

    Streaming: each tensor is read (its chunks assembled, checksums verified)
    and written in turn, so peak extra memory is about the largest tensor,
    not the state (:func:`distcp.convert.convert`). The file appears whole or
    not at all (written under a temporary name, then renamed); an existing
    file is replaced, as torch's function does. Raises
    :class:`~distcp.CheckpointNotFoundError` or
    :class:`~distcp.IncompleteCheckpointError` when the directory holds no
    checkpoint.

    A path step that is an int makes a list when its container's steps are
    exactly ``0 … n-1`` (see :func:`distcp.convert.nest_state_dict`).
    """
    target = Path(torch_save_path)
    if target.is_dir():
        raise CheckpointExistsError(f"{target} is a directory, not a torch.save file path")
    if not Path(dcp_checkpoint_dir).is_dir():
        raise CheckpointNotFoundError(f"{dcp_checkpoint_dir} is not a checkpoint directory")
    convert(dcp_checkpoint_dir, target, to="torch", overwrite=True)


def torch_save_to_dcp(
    torch_save_path: str | os.PathLike[str], dcp_checkpoint_dir: str | os.PathLike[str]
) -> None:
    """Write the state dict in the ``torch.save`` file ``torch_save_path`` as a
    distcp checkpoint in ``dcp_checkpoint_dir`` (no process group).

    The file is read with ``weights_only=True`` and memory-mapped where its
    format allows. A checkpoint already in the directory is replaced (atomically,
    as every distcp save). Raises :class:`~distcp.CheckpointNotFoundError` when
    there is no file, :class:`~distcp.PickleNotAllowedError` when it holds
    objects only a code-running unpickle could build, and
    :class:`~distcp.CheckpointFormatError` when it is not a state dict.
    """
    state = load_torch_save(torch_save_path)
    save(state, checkpoint_id=dcp_checkpoint_dir, no_dist=True)
