"""DCP's ``logger`` module path: distcp logs through the ``"distcp"`` logger.

Raise its level to see each load's read report and each save's phases::

    logging.getLogger("distcp").setLevel(logging.DEBUG)
"""

import logging

__all__: list[str] = []

logger = logging.getLogger("distcp")
