"""The form ``get_*_state_dict`` returns: sharded as the model holds it, or
gathered to full tensors (every rank, or only rank 0 on the CPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distcp.state_dict.full_tensors import full_tensor
from distcp.state_dict.options import StateDictOptions
from distcp.state_dict.tree import Path, map_leaves

__all__ = ["returned_form"]


def returned_form(tree: Any, options: StateDictOptions) -> Any:
    """``tree`` as the options ask. With ``full_state_dict`` the distributed
    tensors are gathered one at a time, in the same order on every rank; with
    ``cpu_offload`` as well, ranks other than 0 drop each gathered tensor at once
    and get ``{}``."""
    if options.full_state_dict:
        return _gathered(tree, to_cpu=options.cpu_offload)
    if options.cpu_offload:
        return map_leaves(tree, _on_cpu)
    return tree


def _gathered(tree: Any, *, to_cpu: bool) -> Any:
    keep = not to_cpu or _rank() == 0

    def gather(path: Path, leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        full = full_tensor(leaf)
        if not keep:
            return None
        return full.cpu() if to_cpu else full

    result = map_leaves(tree, gather)
    return result if keep else {}


def _on_cpu(path: Path, leaf: Any) -> Any:
    return leaf.cpu() if isinstance(leaf, torch.Tensor) else leaf


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
