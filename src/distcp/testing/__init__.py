"""Testing helpers for checkpointing code: :class:`RankPool` runs functions on
N real processes joined over gloo; :class:`StoreTests` is the conformance
suite every byte store passes (subclass it, name a location, and pytest runs
it); :class:`LocalS3Server` is an S3-compatible server on 127.0.0.1 for it."""

from distcp.testing.rank_pool import RankFailure, RankPool, free_port

__all__ = ["RankFailure", "RankPool", "free_port"]
