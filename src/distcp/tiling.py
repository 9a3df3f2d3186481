"""Does a list of chunks tile a tensor exactly? Answered in O(n log n) for
any layout, so that untrusted metadata cannot make checking it slow.

The sweep of :func:`distcp.geometry.find_overlap_of` is fast for sharded
layouts and names the overlapping pair, but a grid of chunks (150 × 150:
3.4 s) or a crafted layout makes it super-linear. Past a work budget the
check switches to corner counting, which holds in every dimension:

    with half-open boxes, the indicator of a box is the signed sum of the
    "orthants" ``{x : x >= c}`` at its 2^k corners ``c`` (sign ``-1`` per
    coordinate taken from the box's end). The chunks tile the tensor exactly
    (every element covered once) if and only if the signed corner counts of
    all chunks, summed, equal those of the tensor's own box, because
    orthants at distinct points are linearly independent.

``k`` is the number of dimensions along which some chunk is not the whole
extent; only those need corners. Each chunk then costs ``2^k`` corners and the
sums are found by sorting (no hashing, so no hash flooding): O(n 2^k log n).
A layout split along more than :data:`MAX_SPLIT_DIMS` dimensions gets the
sweep again with a larger, still linear, budget, and is refused as too
complex to verify only if that runs out too; no real sharding comes near
(meshes have at most a few dimensions).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from distcp.geometry import TooMuchWork, find_overlap_of

__all__ = ["MAX_SPLIT_DIMS", "TilingProblem", "find_repeated", "tiling_problem"]

MAX_SPLIT_DIMS: Final = 6
_SWEEP_COMPARISONS_PER_CHUNK: Final = 2
_SWEEP_COMPARISONS_BASE: Final = 1024
_LAST_RESORT_COMPARISONS_PER_CHUNK: Final = 64


@dataclass(frozen=True)
class TilingProblem:
    """Why chunks do not tile a tensor: two of them ``overlap`` (``pair``
    names them when known), they leave a ``gap`` (cover fewer or more
    elements than the tensor has, none known to overlap), or the layout is
    ``too-complex`` to verify in bounded time."""

    kind: Literal["overlap", "gap", "too-complex"]
    pair: tuple[int, int] | None = None

    def describe(self, numel: int) -> str:
        """The problem in words, for a tensor of ``numel`` elements."""
        if self.kind == "overlap":
            return (
                f"chunks {self.pair[0]} and {self.pair[1]} overlap"
                if self.pair
                else ("chunks overlap")
            )
        if self.kind == "gap":
            return f"chunks do not cover the tensor's {numel} elements"
        return (
            f"the chunk layout is split along more than {MAX_SPLIT_DIMS} dimensions in a "
            "way too costly to verify"
        )


def tiling_problem(
    offsets: Sequence[tuple[int, ...]],
    sizes: Sequence[tuple[int, ...]],
    shape: tuple[int, ...],
) -> TilingProblem | None:
    """None when the boxes ``(offsets[i], sizes[i])`` (valid boxes inside
    ``shape``, all of its ndim) cover every element of ``shape`` exactly
    once; else what is wrong."""
    numel = math.prod(shape)
    covered = sum(map(math.prod, sizes))
    try:
        pair = _sweep(offsets, sizes, _SWEEP_COMPARISONS_PER_CHUNK)
    except TooMuchWork:
        exact = _tiles_by_corners(offsets, sizes, shape)
        if exact is not None:
            return None if exact else TilingProblem("overlap" if covered == numel else "gap")
        try:
            pair = _sweep(offsets, sizes, _LAST_RESORT_COMPARISONS_PER_CHUNK)
        except TooMuchWork:
            return TilingProblem("too-complex")
    if pair is not None:
        return TilingProblem("overlap", pair)
    return None if covered == numel else TilingProblem("gap")


def _sweep(
    offsets: Sequence[tuple[int, ...]], sizes: Sequence[tuple[int, ...]], per_chunk: int
) -> tuple[int, int] | None:
    budget = per_chunk * len(offsets) + _SWEEP_COMPARISONS_BASE
    return find_overlap_of(offsets, sizes, max_comparisons=budget)


def find_repeated(offsets: Sequence[tuple[int, ...]]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of two equal entries of ``offsets``, or
    None; by sorting, so crafted values cannot make it quadratic."""
    order = sorted(range(len(offsets)), key=offsets.__getitem__)
    for a, b in itertools.pairwise(order):
        if offsets[a] == offsets[b]:
            return min(a, b), max(a, b)
    return None


def _tiles_by_corners(
    offsets: Sequence[tuple[int, ...]],
    sizes: Sequence[tuple[int, ...]],
    shape: tuple[int, ...],
) -> bool | None:
    """Exact tiling by signed corner counts; None when the layout is split
    along more than :data:`MAX_SPLIT_DIMS` dimensions."""
    live = [i for i, box_sizes in enumerate(sizes) if 0 not in box_sizes]
    split = [
        d
        for d in range(len(shape))
        if any(offsets[i][d] != 0 or sizes[i][d] != shape[d] for i in live)
    ]
    if len(split) > MAX_SPLIT_DIMS:
        return None
    corners: list[tuple[tuple[int, ...], int]] = []
    for i in live:
        start, size = offsets[i], sizes[i]
        corners.extend(_corners([(start[d], start[d] + size[d]) for d in split]))
    corners.sort(key=operator.itemgetter(0))
    net = []
    for point, group in itertools.groupby(corners, key=operator.itemgetter(0)):
        weight = sum(sign for _, sign in group)
        if weight:
            net.append((point, weight))
    whole = _corners([(0, shape[d]) for d in split])
    whole.sort(key=operator.itemgetter(0))
    return net == whole


def _corners(spans: list[tuple[int, int]]) -> list[tuple[tuple[int, ...], int]]:
    """The corners of the box with these (start, end) spans, each with its
    sign: -1 to the power of the number of coordinates taken from an end."""
    result = []
    for choice in itertools.product((0, 1), repeat=len(spans)):
        point = tuple(span[end] for span, end in zip(spans, choice, strict=True))
        result.append((point, -1 if sum(choice) & 1 else 1))
    return result
