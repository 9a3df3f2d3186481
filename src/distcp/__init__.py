"""distcp: distributed checkpoints for PyTorch.

A drop-in for the public API of ``torch.distributed.checkpoint``::

    import distcp as dcp
    dcp.save(state_dict, checkpoint_id="ckpt/step-100")
    dcp.load(state_dict, checkpoint_id="ckpt/step-100")

with a pickle-free, specified format (``docs/format.md``), checksums verified on
load, and atomic commits that never damage the last good checkpoint.
"""

from distcp import state_dict, training
from distcp.api import load, load_state_dict, save, save_state_dict
from distcp.async_save import AsyncCheckpointerType, async_save
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointException,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    DtypeMismatchError,
    IncompleteCheckpointError,
    KeyMismatchError,
    PickleNotAllowedError,
    RemoteError,
    ShapeMismatchError,
    UnsupportedStorageError,
    UnsupportedValueError,
)
from distcp.filesystem import FileSystemReader, FileSystemWriter, LoadReport
from distcp.load_planner import DefaultLoadPlanner
from distcp.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from distcp.save_planner import DefaultSavePlanner
from distcp.stateful import Stateful
from distcp.storage import StorageReader, StorageWriter, WriteResult

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointerType",
    "BytesStorageMetadata",
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "ChunkStorageMetadata",
    "CorruptCheckpointError",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "DistributedCheckpointError",
    "DtypeMismatchError",
    "FileSystemReader",
    "FileSystemWriter",
    "IncompleteCheckpointError",
    "KeyMismatchError",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "LoadReport",
    "Metadata",
    "MetadataIndex",
    "PickleNotAllowedError",
    "ReadItem",
    "RemoteError",
    "SavePlan",
    "SavePlanner",
    "ShapeMismatchError",
    "Stateful",
    "StorageMeta",
    "StorageReader",
    "StorageWriter",
    "TensorProperties",
    "TensorStorageMetadata",
    "UnsupportedStorageError",
    "UnsupportedValueError",
    "WriteItem",
    "WriteItemType",
    "WriteResult",
    "__version__",
    "async_save",
    "load",
    "load_state_dict",
    "save",
    "save_state_dict",
    "state_dict",
    "training",
]
