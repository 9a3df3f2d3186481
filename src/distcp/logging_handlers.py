"""DCP's ``logging_handlers`` module path (it has no public names in DCP
either): distcp logs through the standard ``logging`` module, logger ``"distcp"``."""

__all__: list[str] = []
