"""Chunk geometry: boxes in a tensor's index space and the bytes they occupy.

A tensor of global shape ``S`` is saved as *chunks*: n-d boxes (``offsets`` +
``sizes``) that together cover the tensor. At load each rank asks for its own
boxes (its shards, possibly in a different layout), and the loader intersects
them with the saved chunks to read only the bytes that overlap. This module is
that arithmetic, kept pure (plain ints and tuples, no torch) so it can be
property-tested against brute force.

Conventions:

* Offsets and sizes are in **elements**, never bytes. A box covers, in each
  dimension ``d``, the half-open range ``[offsets[d], offsets[d] + sizes[d])``.
* A 0-d box (``Box((), ())``) is a scalar: it holds exactly one element.
  A box with any size 0 is *empty* and holds no element.
* Each chunk is stored **row-major** (C order, last index fastest) as raw bytes,
  with every element ``itemsize`` bytes wide.
* Byte runs are ``(byte_offset, byte_length)`` pairs measured from the
  **chunk's first byte** (not the file's): the caller adds the chunk's position
  in its file.
* Regions passed to :func:`byte_runs` and :func:`is_contiguous` are given
  relative to the chunk's origin (see :meth:`Box.relative_to`).

Invalid arguments (negative sizes, mismatched ranks, a region outside its
chunk) raise :class:`ValueError`.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Box",
    "TooMuchWork",
    "byte_runs",
    "coalesce_runs",
    "contains",
    "covering_range",
    "find_overlap",
    "find_overlap_of",
    "intersect",
    "is_contiguous",
    "split_evenly",
    "strides_for",
]


def _as_index_tuple(values: Iterable[object], what: str) -> tuple[int, ...]:
    """Normalise ``values`` to a tuple of plain non-negative ints (accepts
    ``torch.Size``, lists, numpy integers); bools and non-integers are refused."""
    try:
        items = tuple(values)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of ints, got {values!r}") from None
    out: list[int] = []
    for item in items:
        if type(item) is int:  # the common case, checked first: boxes are built often
            value = item
        elif isinstance(item, bool):
            raise ValueError(f"{what} must be ints, got a bool in {items!r}")
        else:
            try:
                value = operator.index(item)  # type: ignore[arg-type]
            except TypeError:
                raise ValueError(f"{what} must be ints, got {item!r} in {items!r}") from None
        if value < 0:
            raise ValueError(f"{what} must be non-negative, got {items!r}")
        out.append(value)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Box:
    """An axis-aligned n-d box of a tensor's index space, in elements.

    Dimension ``d`` spans ``[offsets[d], offsets[d] + sizes[d])``. Both tuples
    have one entry per dimension; a 0-d box is ``Box((), ())`` (one element).
    Fields are normalised to tuples of plain ints, so a ``torch.Size`` or a list
    may be passed.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        offsets = _as_index_tuple(self.offsets, "Box offsets")
        sizes = _as_index_tuple(self.sizes, "Box sizes")
        if len(offsets) != len(sizes):
            raise ValueError(
                f"Box offsets {offsets} and sizes {sizes} have different lengths "
                f"({len(offsets)} vs {len(sizes)})"
            )
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        """The box covering a whole tensor of ``shape`` (all offsets 0)."""
        sizes = _as_index_tuple(shape, "shape")
        return cls((0,) * len(sizes), sizes)

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
        return len(self.sizes)

    @property
    def numel(self) -> int:
        """Number of elements: the product of ``sizes`` (1 for a 0-d box)."""
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        """Exclusive end per dimension: ``offsets + sizes``."""
        return tuple(o + s for o, s in zip(self.offsets, self.sizes, strict=True))

    @property
    def is_empty(self) -> bool:
        """True when some size is 0, so the box holds no element. A 0-d box is
        never empty."""
        return 0 in self.sizes

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of ``outer``'s origin (offsets shifted
        by ``-outer.offsets``). Used to express a region of a chunk relative to
        the chunk, as :func:`byte_runs` wants it.

        Raises ValueError unless ``contains(outer, self)``: a region sticking
        out of its chunk is always a bug upstream.
        """
        if not contains(outer, self):
            raise ValueError(f"{self} is not inside {outer}")
        return Box(
            tuple(a - b for a, b in zip(self.offsets, outer.offsets, strict=True)),
            self.sizes,
        )

    def shifted(self, by: tuple[int, ...]) -> Box:
        """This box moved by ``by`` elements per dimension (entries may be
        negative, as long as the resulting offsets are not)."""
        if len(by) != self.ndim:
            raise ValueError(f"cannot shift a {self.ndim}-d box by {by!r}")
        return Box(tuple(o + b for o, b in zip(self.offsets, by, strict=True)), self.sizes)


def _check_same_ndim(a: Box, b: Box) -> None:
    if a.ndim != b.ndim:
        raise ValueError(f"boxes have different ndim: {a} ({a.ndim}-d) vs {b} ({b.ndim}-d)")


def intersect(a: Box, b: Box) -> Box | None:
    """The box of elements in both ``a`` and ``b``, or None when there is none.

    Two 0-d boxes intersect as ``Box((), ())`` (they are the same scalar). An
    empty box intersects nothing. Raises ValueError when the ndims differ.
    """
    _check_same_ndim(a, b)
    offsets: list[int] = []
    sizes: list[int] = []
    for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes, strict=True):
        lo = max(ao, bo)
        hi = min(ao + as_, bo + bs)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


def contains(outer: Box, inner: Box) -> bool:
    """True when ``inner`` lies within ``outer``, coordinate-wise:
    ``outer.offsets <= inner.offsets`` and ``inner.ends <= outer.ends`` in every
    dimension.

    The test is on coordinates, not element sets, so an empty ``inner`` counts
    as contained only when its position lies within ``outer`` too (a 0-size
    chunk at offset 100 of a 10-element tensor is still malformed). Raises
    ValueError when the ndims differ.
    """
    _check_same_ndim(outer, inner)
    return all(
        oo <= io and io + is_ <= oo + os_
        for oo, os_, io, is_ in zip(
            outer.offsets, outer.sizes, inner.offsets, inner.sizes, strict=True
        )
    )


def _spans_overlap(
    a_offsets: tuple[int, ...],
    a_sizes: tuple[int, ...],
    b_offsets: tuple[int, ...],
    b_sizes: tuple[int, ...],
) -> bool:
    return all(
        max(ao, bo) < min(ao + as_, bo + bs)
        for ao, as_, bo, bs in zip(a_offsets, a_sizes, b_offsets, b_sizes, strict=True)
    )


def find_overlap(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of some two boxes that share an element,
    or None when the boxes are pairwise disjoint. Empty boxes overlap nothing.
    Raises ValueError when the boxes' ndims differ.

    Sweep line: boxes are sorted along one dimension and each is compared only
    with the boxes whose range in that dimension is still open, so a layout
    sharded along that dimension costs O(n log n), not O(n^2). The dimension
    swept is the one with the most distinct offsets (dim 0 for the usual
    row-wise sharding, dim 1 for column-wise), ties going to the lowest.
    """
    if not boxes:
        return None
    ndim = boxes[0].ndim
    for box in boxes:
        if box.ndim != ndim:
            raise ValueError(f"boxes have different ndim: {boxes[0]} vs {box}")
    return find_overlap_of([box.offsets for box in boxes], [box.sizes for box in boxes])


class TooMuchWork(Exception):
    """:func:`find_overlap_of` would compare more pairs than it was allowed."""


def find_overlap_of(
    offsets: Sequence[tuple[int, ...]],
    sizes: Sequence[tuple[int, ...]],
    *,
    max_comparisons: int | None = None,
) -> tuple[int, int] | None:
    """:func:`find_overlap` of the boxes ``Box(offsets[i], sizes[i])``, given
    as two parallel lists of tuples that are already valid box fields (plain
    non-negative ints, one ndim for all), so no :class:`Box` need be built:
    the coordinator checks a million chunks with it.

    Same answer as :func:`find_overlap`, the same pair included. A cheap test
    comes first: when the boxes' ranges along the swept dimension are already
    pairwise disjoint (every sharded layout), no two boxes can share an element
    and the sweep is skipped.

    The sweep is O(n log n) when few boxes are open at once (a sharded
    layout) but O(n^1.5) on a grid of boxes and O(n^2) at worst; with
    ``max_comparisons`` it raises :class:`TooMuchWork` rather than compare
    more pairs than that (see :mod:`distcp.tiling` for a bound that holds).
    """
    live = [i for i, box_sizes in enumerate(sizes) if 0 not in box_sizes]
    if len(live) < 2:
        return None
    ndim = len(sizes[live[0]])
    if ndim == 0:
        return live[0], live[1]  # every 0-d box is the same single element

    live_offsets = [offsets[i] for i in live] if len(live) < len(offsets) else offsets
    dim = max(
        range(ndim),
        key=lambda d: (len(set(map(operator.itemgetter(d), live_offsets))), -d),
    )
    if _disjoint_along(dim, live_offsets, [sizes[i] for i in live]):
        return None

    live.sort(key=lambda i: offsets[i][dim])
    active: list[tuple[int, int]] = []  # heap of (end along dim, index)
    budget = math.inf if max_comparisons is None else max_comparisons
    for i in live:
        start = offsets[i][dim]
        while active and active[0][0] <= start:
            heapq.heappop(active)
        budget -= len(active)
        if budget < 0:
            raise TooMuchWork(f"more than {max_comparisons} pairs of boxes to compare")
        for _, j in active:
            if _spans_overlap(offsets[i], sizes[i], offsets[j], sizes[j]):
                return (i, j) if i < j else (j, i)
        heapq.heappush(active, (start + sizes[i][dim], i))
    return None


def _disjoint_along(
    dim: int, offsets: Sequence[tuple[int, ...]], sizes: Sequence[tuple[int, ...]]
) -> bool:
    """True when the ranges along ``dim`` of these non-empty boxes are pairwise
    disjoint (then so are the boxes). Sorted by start, ranges are pairwise
    disjoint exactly when each starts at or after the end of the one before."""
    starts = list(map(operator.itemgetter(dim), offsets))
    ends = list(map(operator.add, starts, map(operator.itemgetter(dim), sizes)))
    if not all(map(operator.le, starts, starts[1:])):
        spans = sorted(zip(starts, ends, strict=True))
        starts = [start for start, _ in spans]
        ends = [end for _, end in spans]
    return all(map(operator.ge, starts[1:], ends))


def split_evenly(size: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of part ``index`` of ``size`` elements split into
    ``parts``, the way ``torch.chunk`` and DTensor's ``Shard`` split a dim.

    Every part but the last non-empty one holds ``ceil(size / parts)``
    elements; trailing parts may be short or empty. An empty part has length 0
    and its offset clamped to ``size``, so the parts always tile ``[0, size)``
    in order.
    """
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    if not 0 <= index < parts:
        raise ValueError(f"index must be in [0, {parts}), got {index}")
    chunk = -(-size // parts)
    start = min(index * chunk, size)
    end = min(start + chunk, size)
    return start, end - start


def strides_for(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major (C order) element strides of a tensor of ``shape``.

    Zero-size dims count as 1 when computing the strides of the dims before
    them, as torch does (``torch.empty(2, 0, 3).stride() == (3, 3, 1)``); the
    strides of an empty tensor address no element anyway.
    """
    sizes = _as_index_tuple(shape, "shape")
    strides = [0] * len(sizes)
    stride = 1
    for d in range(len(sizes) - 1, -1, -1):
        strides[d] = stride
        stride *= max(sizes[d], 1)
    return tuple(strides)


def _check_region(chunk_sizes: Sequence[int], region: Box) -> tuple[int, ...]:
    chunk = Box.full(chunk_sizes)
    if chunk.ndim != region.ndim:
        raise ValueError(f"region {region} is {region.ndim}-d but the chunk is {chunk.ndim}-d")
    if not contains(chunk, region):
        raise ValueError(f"region {region} is not inside a chunk of shape {chunk.sizes}")
    return chunk.sizes


def _first_contiguous_dim(chunk_sizes: tuple[int, ...], region: Box) -> int:
    """The smallest ``k`` such that the region spans every dim after ``k`` in
    full: within one index of dims ``< k``, the region's elements are then one
    contiguous block. Returns 0 when the region is the whole chunk."""
    k = len(chunk_sizes) - 1
    while k > 0 and region.offsets[k] == 0 and region.sizes[k] == chunk_sizes[k]:
        k -= 1
    return k


def byte_runs(chunk_sizes: tuple[int, ...], region: Box, itemsize: int) -> list[tuple[int, int]]:
    """The ``(byte_offset, byte_length)`` runs holding exactly ``region``
    inside a row-major chunk of shape ``chunk_sizes``.

    ``region`` is relative to the chunk's origin and must lie inside it; byte
    offsets are from the chunk's first byte. Runs come in increasing order,
    non-overlapping, with adjacent runs merged, so there is exactly one run per
    maximal contiguous stretch. Work is proportional to the number of runs, not
    of elements: the region's trailing dims that span the chunk in full,
    together with the first dim that does not, form one block per index of the
    dims before them. A 0-d region is ``[(0, itemsize)]``; an empty one is
    ``[]``.
    """
    if itemsize < 1:
        raise ValueError(f"itemsize must be positive, got {itemsize}")
    sizes = _check_region(chunk_sizes, region)
    if region.is_empty:
        return []
    if region.ndim == 0:
        return [(0, itemsize)]
    strides = strides_for(sizes)
    k = _first_contiguous_dim(sizes, region)
    block = region.sizes[k] * strides[k] * itemsize
    starts = [region.offsets[k] * strides[k] * itemsize]
    for d in range(k - 1, -1, -1):
        step = strides[d] * itemsize
        base = region.offsets[d] * step
        starts = [base + i * step + s for i in range(region.sizes[d]) for s in starts]
    # Already maximal: dim k is not spanned in full (or k == 0 and there is a
    # single block), so each block ends before the next one starts.
    return [(start, block) for start in starts]


def is_contiguous(chunk_sizes: tuple[int, ...], region: Box) -> bool:
    """True when ``region`` occupies a single contiguous byte range of the
    row-major chunk, so it can be read with one read straight into place.
    Equivalent to ``len(byte_runs(chunk_sizes, region, 1)) <= 1`` (an empty
    region, needing no read, counts as contiguous) but O(ndim)."""
    sizes = _check_region(chunk_sizes, region)
    if region.is_empty or region.ndim == 0:
        return True
    k = _first_contiguous_dim(sizes, region)
    return all(s == 1 for s in region.sizes[:k])


def covering_range(runs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """``(start, length)`` of the smallest byte range spanning every run: the
    single read that fetches them all. Runs may come in any order; no runs
    gives ``(0, 0)``."""
    lo: int | None = None
    hi = 0
    for offset, length in runs:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid run ({offset}, {length})")
        lo = offset if lo is None else min(lo, offset)
        hi = max(hi, offset + length)
    if lo is None:
        return 0, 0
    return lo, hi - lo


def coalesce_runs(runs: Iterable[tuple[int, int]], max_gap: int) -> list[tuple[int, int]]:
    """Merge byte runs into fewer, larger reads, trading up to ``max_gap``
    wasted bytes per gap for one syscall less.

    Returns ``(offset, length)`` reads, sorted and disjoint, that together cover
    every input run. Runs separated by a gap of at most ``max_gap`` bytes (0:
    only touching or overlapping runs) share a read; a gap wider than that is
    never read. Each read starts at some run's start and ends at some run's end.
    Zero-length runs need no bytes and are dropped. Runs may come in any order.
    """
    if max_gap < 0:
        raise ValueError(f"max_gap must be non-negative, got {max_gap}")
    reads: list[tuple[int, int]] = []
    for offset, length in sorted(runs):
        if offset < 0 or length < 0:
            raise ValueError(f"invalid run ({offset}, {length})")
        if length == 0:
            continue
        if reads:
            start, end = reads[-1][0], reads[-1][0] + reads[-1][1]
            if offset - end <= max_gap:
                reads[-1] = (start, max(end, offset + length) - start)
                continue
        reads.append((offset, length))
    return reads
