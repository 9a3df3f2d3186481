"""DCP's ``hf_storage`` module path.

``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader`` here *are* torch's
classes (safetensors files, torch's guarantees, no distcp checksums): torch's
storage works with ``distcp.save`` / ``distcp.load``, so DCP code that imports
them from this path keeps working. Pass ``planner=DefaultSavePlanner`` of
either library; the files are real safetensors files that Hugging Face tools open.
"""

from torch.distributed.checkpoint.hf_storage import (
    HuggingFaceStorageReader,
    HuggingFaceStorageWriter,
)

__all__ = ["HuggingFaceStorageReader", "HuggingFaceStorageWriter"]
