"""DCP's ``state_dict_loader`` module path: the load entry points."""

from distcp.api import load, load_state_dict

__all__ = ["load", "load_state_dict"]
