"""DCP's ``state_dict_saver`` module path: the save entry points."""

from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse

from distcp.api import save, save_state_dict
from distcp.async_save import async_save

__all__ = ["AsyncCheckpointerType", "AsyncSaveResponse", "async_save", "save", "save_state_dict"]
