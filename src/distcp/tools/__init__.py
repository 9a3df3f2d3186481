"""What the ``distcp`` command line does, as functions that return plain
data (dicts and lists, ready for ``--json``): :func:`inspect_checkpoint`,
:func:`verify_checkpoint`, :func:`diff_checkpoints`, :func:`list_checkpoints`.
Conversion is :func:`distcp.convert.convert`."""

from distcp.tools.diff import diff_checkpoints
from distcp.tools.inspect import inspect_checkpoint, layout_summary
from distcp.tools.listing import list_checkpoints
from distcp.tools.verify import verify_checkpoint

__all__ = [
    "diff_checkpoints",
    "inspect_checkpoint",
    "layout_summary",
    "list_checkpoints",
    "verify_checkpoint",
]
