"""DCP's ``resharding`` module path (no public names in DCP either).
distcp's resharding is the n-d box geometry of :mod:`distcp.geometry`."""

__all__: list[str] = []
