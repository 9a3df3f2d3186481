"""DCP's ``utils`` module path: finding a saved item's object in a state dict."""

from __future__ import annotations

from typing import Any

import torch

from distcp.errors import CheckpointArgumentError
from distcp.metadata import STATE_DICT_TYPE, MetadataIndex
from distcp.tensor_layout import tensor_layout

__all__ = ["find_state_dict_object", "find_tensor_shard"]


def find_state_dict_object(state_dict: STATE_DICT_TYPE, index: MetadataIndex) -> Any:
    """The object of a flat ``state_dict`` that ``index`` names: for a tensor,
    this rank's chunk at ``index.offset``."""
    if index.fqn not in state_dict:
        raise CheckpointArgumentError(f"Could not find FQN {index.fqn!r} in the state dict")
    found = state_dict[index.fqn]
    if isinstance(found, torch.Tensor):
        return find_tensor_shard(found, index)
    if index.offset is not None:
        raise CheckpointArgumentError(
            f"key {index.fqn!r}: an offset {list(index.offset)} was given for a non-tensor value"
        )
    return found


def find_tensor_shard(tensor: torch.Tensor, index: MetadataIndex) -> torch.Tensor:
    """This rank's chunk of ``tensor`` (plain, DTensor or ShardedTensor) that
    starts at ``index.offset``; the whole local tensor when no offset is given."""
    chunks = tensor_layout(index.fqn, tensor).chunks
    if index.offset is None:
        if len(chunks) != 1:
            raise CheckpointArgumentError(
                f"key {index.fqn!r}: {len(chunks)} local chunks, and no offset says which"
            )
        return chunks[0].tensor
    for chunk in chunks:
        if chunk.box.offsets == tuple(index.offset):
            return chunk.tensor
    raise CheckpointArgumentError(
        f"key {index.fqn!r}: no local chunk at offsets {list(index.offset)}"
    )
