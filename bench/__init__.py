"""Benchmark distcp against its peers in one run on the same state.

Peers: torch DCP (``torch.distributed.checkpoint`` with its FileSystemWriter and
FileSystemReader), ``torch.save``/``torch.load``, and two hardware limits: a raw
write+fsync (saves) or pread (loads) of the same bytes with the same parallelism,
and a memory copy of the same bytes (loads).

    python -m bench.run [--size-gib 1] [--rounds 5] [--scenarios a,b,c,d] [--dir DIR]

Layout: ``run`` (CLI and the round-by-round driver), ``scenarios`` (what is
saved and loaded, in which layouts; data generation and verification),
``peers`` (one adapter per library), ``rank_tasks`` (what each rank process
does on request, on ``distcp.testing.RankPool``'s processes), ``measure``
(timing, peak RSS, cache eviction, ABBA order, medians), ``report`` (machine
description, JSON and markdown).
"""
