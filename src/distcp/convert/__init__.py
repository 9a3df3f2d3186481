"""Converters between checkpoint formats, each streaming or memory-bounded.

- :func:`convert_to_distcp`: a torch DCP (or distcp) checkpoint directory → a
  distcp one, one item in memory at a time.
- :func:`convert`: any checkpoint (distcp, torch DCP, ``torch.save``,
  safetensors) → distcp, torch DCP's format, one ``torch.save`` file, or
  sharded safetensors, one tensor in memory at a time (:mod:`.export`).
- :mod:`distcp.format_utils` (torch DCP's names): distcp ↔ ``torch.save``.
"""

from distcp.convert.dynamic_meta import DynamicMetaLoadPlanner
from distcp.convert.export import convert
from distcp.convert.full_state import FullStateLoadPlanner, nest_state_dict
from distcp.convert.streaming import SourceReadingSavePlanner, convert_to_distcp
from distcp.convert.torch_save_file import load_torch_save
from distcp.convert.torch_save_reader import BroadcastingTorchSaveReader

__all__ = [
    "BroadcastingTorchSaveReader",
    "DynamicMetaLoadPlanner",
    "FullStateLoadPlanner",
    "SourceReadingSavePlanner",
    "convert",
    "convert_to_distcp",
    "load_torch_save",
    "nest_state_dict",
]
