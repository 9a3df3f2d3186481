"""DCP's ``quantized_hf_storage`` module path: torch's own reader (see
:mod:`distcp.hf_storage` for why torch's Hugging Face storage classes are
offered as they are)."""

from torch.distributed.checkpoint.quantized_hf_storage import QuantizedHuggingFaceStorageReader

__all__ = ["QuantizedHuggingFaceStorageReader"]
