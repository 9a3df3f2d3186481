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

import torch

from distcp.api import load, save
from distcp.convert.dynamic_meta import DynamicMetaLoadPlanner
from distcp.convert.full_state import FullStateLoadPlanner
from distcp.convert.torch_save_file import load_torch_save
from distcp.convert.torch_save_reader import BroadcastingTorchSaveReader
from distcp.filesystem.layout import new_save_id
from distcp.filesystem.reader import FileSystemReader

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

    Run it on one process: it holds the whole state in memory (once: each
    tensor is read in place into its final buffer). The file appears whole or
    not at all (written under a temporary name, then renamed). Raises
    :class:`~distcp.CheckpointNotFoundError` or
    :class:`~distcp.IncompleteCheckpointError` when the directory holds no
    checkpoint.

    A path step that is an int makes a list when its container's steps are
    exactly ``0 … n-1`` (see :func:`distcp.convert.nest_state_dict`).
    """
    planner = FullStateLoadPlanner()
    load({}, storage_reader=FileSystemReader(dcp_checkpoint_dir), planner=planner, no_dist=True)
    state = planner.nested_state_dict()
    target = Path(torch_save_path)
    temporary = target.with_name(f".{target.name}.tmp-{new_save_id()}")
    try:
        torch.save(state, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
