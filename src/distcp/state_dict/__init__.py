"""``distcp.state_dict``: model and optimizer state dicts that reshard.

The counterpart of ``torch.distributed.checkpoint.state_dict``, with the same
names and meanings. Keys are clean FQNs under every wrapper (DDP, FSDP1, FSDP2,
tensor parallel, ``torch.compile``, activation checkpointing); optimizer state
is keyed by parameter FQN and has each parameter's layout, so a checkpoint
saved under one parallelism loads under another.
"""

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
    "IncompatibleKeys",
    "StateDictOptions",
    "get_model_state_dict",
    "get_optimizer_state_dict",
    "get_state_dict",
    "set_model_state_dict",
    "set_optimizer_state_dict",
    "set_state_dict",
]
