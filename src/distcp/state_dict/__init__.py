"""``distcp.state_dict``: model and optimizer state dicts that reshard.

The counterpart of ``torch.distributed.checkpoint.state_dict``, with the same
names and meanings. Keys are clean FQNs under every wrapper (DDP, FSDP1, FSDP2,
tensor parallel, ``torch.compile``, activation checkpointing); optimizer state
is keyed by parameter FQN and has each parameter's layout, so a checkpoint
saved under one parallelism loads under another.
"""

# DCP's type aliases (names of plain types, nothing to reimplement).
from torch.distributed.checkpoint.state_dict import (
    FQNS_T,
    DictValueType,
    ListDictValueType,
    OptimizerStateType,
    PrimitiveType,
    ValueType,
)

from distcp.state_dict.api import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from distcp.state_dict.model import IncompatibleKeys
from distcp.state_dict.options import StateDictOptions

__all__ = [
    "FQNS_T",
    "DictValueType",
    "IncompatibleKeys",
    "ListDictValueType",
    "OptimizerStateType",
    "PrimitiveType",
    "StateDictOptions",
    "ValueType",
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
]
