"""Loading checkpoints written by torch DCP (``torch.distributed.checkpoint``'s
``FileSystemWriter``: a pickled ``.metadata`` and ``__<rank>_<n>.distcp`` files).

``distcp.FileSystemReader`` switches to this package when a directory holds a
torch DCP ``.metadata`` pickle and no distcp metadata, so ``distcp.load`` loads
such a checkpoint resharded and in place. Nothing in it is ever run: the
metadata goes through a restricted unpickler (:mod:`.safe_unpickle`, after the
opcode check of :mod:`.pickle_scan`) and is checked field by field
(:mod:`.structure`) before any data file is opened (:mod:`.files`); data goes
through ``torch.load(weights_only=True)`` (:mod:`.reader`).
"""

from distcp.torch_dcp.reader import (
    TORCH_METADATA_FILE_NAME,
    TorchDcpCheckpoint,
    is_torch_dcp_checkpoint,
    read_torch_metadata,
)
from distcp.torch_dcp.safe_unpickle import SafeUnpickler, safe_loads

__all__ = [
    "TORCH_METADATA_FILE_NAME",
    "SafeUnpickler",
    "TorchDcpCheckpoint",
    "is_torch_dcp_checkpoint",
    "read_torch_metadata",
    "safe_loads",
]
