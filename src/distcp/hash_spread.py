"""A guard against hash flooding while decoding untrusted checkpoints.

Python's dicts and sets cost O(k) per insertion once k keys share a hash, so
n keys crafted to collide make building one O(n²). Integer hashes are not
randomised (``hash(n) == n mod (2**61 - 1)``), so big integers, and tuples,
sizes and offsets built from them, can be made to collide at will: 20,000
such set items took 7.6 s to decode. A decoder counts the hashes of the keys
it is about to insert and refuses, as a format error, more than
:data:`MAX_EQUAL_HASHES` keys with one hash: genuine data never comes close
(distinct ints below 2**61 never collide), and every insertion then costs at
most that many comparisons, so decoding stays linear.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_EQUAL_HASHES", "HashSpread"]

MAX_EQUAL_HASHES: Final = 32


class HashSpread:
    """Counts the hashes of the keys of one dict or set as they are added."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        # Hash values are ints below 2**61 in size, which hash to themselves:
        # this dict cannot be flooded in turn.
        self._counts: dict[int, int] = {}

    def add(self, key: object) -> str | None:
        """Count ``key`` (hashable); a description of the problem when too
        many keys share its hash, else None."""
        value = hash(key)
        count = self._counts.get(value, 0) + 1
        self._counts[value] = count
        if count > MAX_EQUAL_HASHES:
            return (
                f"more than {MAX_EQUAL_HASHES} keys share one hash value "
                "(crafted to make decoding quadratic)"
            )
        return None
