"""distcp: distributed checkpoints for PyTorch.

A drop-in for the public API of ``torch.distributed.checkpoint``::

    import distcp as dcp
    dcp.save(state_dict, checkpoint_id="ckpt/step-100")
    dcp.load(state_dict, checkpoint_id="ckpt/step-100")

with a pickle-free, specified format (``docs/format.md``), checksums verified on
load, and atomic commits that never damage the last good checkpoint.
"""

from distcp import (
    default_planner,
    filesystem,
    format_utils,
    hf_storage,
    logger,
    logging_handlers,
    metadata,
    optimizer,
    planner,
    planner_helpers,
    quantized_hf_storage,
    resharding,
    staging,
    state_dict,
    state_dict_loader,
    state_dict_saver,
    stateful,
    storage,
    training,
    utils,
)
from distcp._fsspec_filesystem import FsspecReader, FsspecWriter
from distcp.api import load, load_state_dict, save, save_state_dict
from distcp.async_save import AsyncCheckpointerType, AsyncSaveResponse, async_save
from distcp.errors import (
    CheckpointArgumentError,
    CheckpointError,
    CheckpointException,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    CommitOutcomeUnknownError,
    CommitWarning,
    ConcurrentSaveError,
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
from distcp.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from distcp.load_planner import DefaultLoadPlanner
from distcp.manager import CheckpointManager
from distcp.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.optimizer import load_sharded_optimizer_state_dict
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
from distcp.quantized_hf_storage import QuantizedHuggingFaceStorageReader
from distcp.safetensors_storage import SafetensorsReader
from distcp.save_planner import DefaultSavePlanner
from distcp.stateful import Stateful
from distcp.storage import StorageReader, StorageWriter, WriteResult

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointerType",
    "AsyncSaveResponse",
    "BytesStorageMetadata",
    "CheckpointArgumentError",
    "CheckpointError",
    "CheckpointException",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ChunkStorageMetadata",
    "CollectiveTimeoutError",
    "CommitOutcomeUnknownError",
    "CommitWarning",
    "ConcurrentSaveError",
    "CorruptCheckpointError",
    "DefaultLoadPlanner",
    "DefaultSavePlanner",
    "DistributedCheckpointError",
    "DtypeMismatchError",
    "FileSystemReader",
    "FileSystemWriter",
    "FsspecReader",
    "FsspecWriter",
    "HuggingFaceStorageReader",
    "HuggingFaceStorageWriter",
    "IncompleteCheckpointError",
    "KeyMismatchError",
    "LoadItemType",
    "LoadPlan",
    "LoadPlanner",
    "LoadReport",
    "Metadata",
    "MetadataIndex",
    "PickleNotAllowedError",
    "QuantizedHuggingFaceStorageReader",
    "ReadItem",
    "RemoteError",
    "SafetensorsReader",
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
    "default_planner",
    "filesystem",
    "format_utils",
    "hf_storage",
    "load",
    "load_sharded_optimizer_state_dict",
    "load_state_dict",
    "logger",
    "logging_handlers",
    "metadata",
    "optimizer",
    "planner",
    "planner_helpers",
    "quantized_hf_storage",
    "resharding",
    "save",
    "save_state_dict",
    "staging",
    "state_dict",
    "state_dict_loader",
    "state_dict_saver",
    "stateful",
    "storage",
    "training",
    "utils",
]
