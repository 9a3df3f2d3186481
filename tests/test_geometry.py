"""Property tests of distcp.geometry against brute-force models.

Boxes are checked against explicit element sets, byte runs against numpy
arrays sliced element by element, find_overlap against an O(n^2) scan and
split_evenly against torch itself.
"""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distcp.geometry import (
    Box,
    byte_runs,
    coalesce_runs,
    contains,
    covering_range,
    find_overlap,
    intersect,
    is_contiguous,
    split_evenly,
    strides_for,
)

# --------------------------------------------------------------------------- strategies

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)
itemsizes = st.sampled_from([1, 2, 4, 8, 16])


nonempty_shapes = st.lists(st.integers(1, 7), min_size=0, max_size=4).map(tuple)


@st.composite
def boxes_in(draw: st.DrawFn, shape: tuple[int, ...], nonempty: bool = False) -> Box:
    """A box lying inside a tensor of ``shape``; empty unless ``nonempty``
    (which needs a shape without zeros)."""
    offsets, sizes = [], []
    for size in shape:
        offset = draw(st.integers(0, size - 1 if nonempty else size))
        offsets.append(offset)
        sizes.append(draw(st.integers(1 if nonempty else 0, size - offset)))
    return Box(tuple(offsets), tuple(sizes))


@st.composite
def shape_and_box(draw: st.DrawFn, nonempty: bool | None = None) -> tuple[tuple[int, ...], Box]:
    """A shape and a box inside it: non-empty half the time unless told."""
    if nonempty is None:
        nonempty = draw(st.booleans())
    shape = draw(nonempty_shapes if nonempty else shapes)
    return shape, draw(boxes_in(shape, nonempty))


@st.composite
def two_boxes(draw: st.DrawFn) -> tuple[Box, Box]:
    """Two boxes of one ndim, anywhere in a small space (not necessarily at 0)."""
    shape = draw(shapes)
    nonempty = draw(st.booleans())
    return draw(boxes_in(shape)), draw(boxes_in(shape, nonempty and 0 not in shape))


@st.composite
def box_sets(draw: st.DrawFn) -> list[Box]:
    """A list of same-ndim boxes, built to be disjoint about half the time: a
    tiling of a shape (from split_evenly-free arithmetic) with a few boxes
    dropped, moved or resized; otherwise random boxes."""
    shape = draw(st.lists(st.integers(1, 7), min_size=0, max_size=3).map(tuple))
    if draw(st.booleans()):
        return draw(st.lists(boxes_in(shape), max_size=8))
    cuts = []
    for size in shape:
        inner = draw(st.lists(st.integers(1, size), max_size=3, unique=True))
        points = sorted({0, size, *inner})
        cuts.append(list(itertools.pairwise(points)))
    tiles = [
        Box(tuple(lo for lo, _ in ranges), tuple(hi - lo for lo, hi in ranges))
        for ranges in itertools.product(*cuts)
    ]
    tiles = draw(st.permutations(tiles))
    tiles = tiles[: draw(st.integers(0, len(tiles)))]
    for _ in range(draw(st.integers(0, 2))):
        if tiles:
            tiles[draw(st.integers(0, len(tiles) - 1))] = draw(boxes_in(shape))
    return tiles


@st.composite
def run_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    return draw(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=12))


# --------------------------------------------------------------------------- brute force


def elements(box: Box) -> set[tuple[int, ...]]:
    """Every index tuple the box covers."""
    ranges = [range(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True)]
    return set(itertools.product(*ranges))


def slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))


def brute_runs(shape: tuple[int, ...], region: Box, itemsize: int) -> list[tuple[int, int]]:
    """Maximal byte runs of ``region``, found by listing its flat element indices."""
    flat = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)[slices(region)]
    indices = [int(i) for i in flat.ravel()]
    assert indices == sorted(indices)
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(lo * itemsize, (hi - lo) * itemsize) for lo, hi in runs]


def run_bytes(runs: list[tuple[int, int]]) -> set[int]:
    return {b for offset, length in runs for b in range(offset, offset + length)}


# --------------------------------------------------------------------------- Box


@given(shape_and_box())
def test_box_properties_match_numpy(case: tuple[tuple[int, ...], Box]) -> None:
    _, box = case
    region = np.zeros(box.ends)[slices(box)]
    assert box.ndim == region.ndim
    assert box.numel == region.size == len(elements(box))
    assert box.is_empty == (region.size == 0)
    assert box.ends == tuple(o + s for o, s in zip(box.offsets, box.sizes, strict=True))


@given(shapes)
def test_full_covers_the_shape(shape: tuple[int, ...]) -> None:
    box = Box.full(shape)
    assert box.offsets == (0,) * len(shape)
    assert box.sizes == shape
    assert box.numel == int(np.prod(shape, dtype=np.int64))
    assert elements(box) == set(np.ndindex(*shape))


def test_zero_d_box() -> None:
    scalar = Box((), ())
    assert scalar.ndim == 0
    assert scalar.numel == 1
    assert scalar.ends == ()
    assert not scalar.is_empty
    assert Box.full(()) == scalar


def test_box_normalises_to_plain_int_tuples() -> None:
    box = Box(torch.Size([1, 2]), [np.int64(3), 4])  # type: ignore[arg-type]
    assert box == Box((1, 2), (3, 4))
    assert type(box.offsets) is tuple and type(box.sizes) is tuple
    assert all(type(v) is int for v in box.offsets + box.sizes)
    assert hash(box) == hash(Box((1, 2), (3, 4)))
    assert Box.full(torch.Size([2, 3])) == Box((0, 0), (2, 3))


@pytest.mark.parametrize(
    ("offsets", "sizes"),
    [
        ((0,), (1, 2)),  # length mismatch
        ((0, 0), ()),
        ((-1,), (2,)),  # negative offset
        ((0,), (-2,)),  # negative size
        ((0.0,), (1,)),  # not ints
        ((0,), (1.5,)),
        ((True,), (1,)),
        (("0",), (1,)),
        (0, (1,)),  # not a sequence
    ],
)
def test_box_validation(offsets: object, sizes: object) -> None:
    with pytest.raises(ValueError):
        Box(offsets, sizes)  # type: ignore[arg-type]


def test_box_is_frozen() -> None:
    box = Box((0,), (1,))
    with pytest.raises(AttributeError):
        box.offsets = (1,)  # type: ignore[misc]


@given(shape_and_box(), st.lists(st.integers(0, 5), min_size=4, max_size=4))
def test_relative_to_and_shifted_round_trip(
    case: tuple[tuple[int, ...], Box], origin: list[int]
) -> None:
    shape, inner = case
    by = tuple(origin[: len(shape)])
    outer = Box.full(shape).shifted(by)
    placed = inner.shifted(by)
    assert contains(outer, placed)
    assert placed.relative_to(outer) == inner
    assert elements(placed) == {
        tuple(i + b for i, b in zip(e, by, strict=True)) for e in elements(inner)
    }


def test_relative_to_and_shifted_errors() -> None:
    outer = Box((2, 2), (3, 3))
    assert Box((3, 2), (2, 1)).relative_to(outer) == Box((1, 0), (2, 1))
    with pytest.raises(ValueError):
        Box((1, 2), (1, 1)).relative_to(outer)  # starts before outer
    with pytest.raises(ValueError):
        Box((4, 2), (2, 1)).relative_to(outer)  # ends after outer
    with pytest.raises(ValueError):
        Box((2,), (1,)).relative_to(outer)  # ndim mismatch
    assert outer.shifted((-2, 1)) == Box((0, 3), (3, 3))
    with pytest.raises(ValueError):
        outer.shifted((-3, 0))  # negative result
    with pytest.raises(ValueError):
        outer.shifted((1,))


# --------------------------------------------------------------------------- intersect / contains


@given(two_boxes())
def test_intersect_matches_element_sets(pair: tuple[Box, Box]) -> None:
    a, b = pair
    expected = elements(a) & elements(b)
    result = intersect(a, b)
    assert result == intersect(b, a)
    if not expected:
        assert result is None
    else:
        assert result is not None
        assert not result.is_empty
        assert elements(result) == expected
        assert contains(a, result) and contains(b, result)


def test_intersect_zero_d_and_errors() -> None:
    assert intersect(Box((), ()), Box((), ())) == Box((), ())
    assert intersect(Box((0,), (0,)), Box((0,), (3,))) is None
    assert intersect(Box((0,), (2,)), Box((2,), (3,))) is None  # touching, not overlapping
    with pytest.raises(ValueError):
        intersect(Box((0,), (1,)), Box((0, 0), (1, 1)))
    with pytest.raises(ValueError):
        intersect(Box((), ()), Box((0,), (1,)))


@given(two_boxes())
def test_contains_matches_element_sets(pair: tuple[Box, Box]) -> None:
    outer, inner = pair
    if inner.is_empty:
        expected = all(
            oo <= io and ie <= oe
            for oo, oe, io, ie in zip(
                outer.offsets, outer.ends, inner.offsets, inner.ends, strict=True
            )
        )
    else:
        expected = elements(inner) <= elements(outer)
    assert contains(outer, inner) == expected
    assert contains(outer, outer)


def test_contains_cases() -> None:
    assert contains(Box((), ()), Box((), ()))
    assert contains(Box((0,), (10,)), Box((10,), (0,)))
    assert not contains(Box((0,), (10,)), Box((11,), (0,)))  # empty but out of place
    with pytest.raises(ValueError):
        contains(Box((0,), (10,)), Box((), ()))


# --------------------------------------------------------------------------- find_overlap


def brute_overlaps(boxes: list[Box]) -> set[tuple[int, int]]:
    return {
        (i, j)
        for i, j in itertools.combinations(range(len(boxes)), 2)
        if elements(boxes[i]) & elements(boxes[j])
    }


@given(box_sets())
def test_find_overlap_matches_brute_force(boxes: list[Box]) -> None:
    expected = brute_overlaps(boxes)
    result = find_overlap(boxes)
    if expected:
        assert result in expected
    else:
        assert result is None


def test_find_overlap_cases() -> None:
    assert find_overlap([]) is None
    assert find_overlap([Box((), ())]) is None
    assert find_overlap([Box((), ()), Box((), ())]) == (0, 1)
    assert find_overlap([Box((0,), (0,)), Box((0,), (0,)), Box((0,), (5,))]) is None
    assert find_overlap([Box((4,), (2,)), Box((0,), (4,)), Box((5,), (1,))]) == (0, 2)
    with pytest.raises(ValueError):
        find_overlap([Box((0,), (1,)), Box((0, 0), (1, 1))])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dim", [0, 1])
def test_find_overlap_is_fast_for_sharded_layouts(dim: int) -> None:
    n = 20_000

    def shard(i: int, width: int = 1) -> Box:
        offsets, sizes = [0, 0], [3, 3]
        offsets[dim], sizes[dim] = i, width
        return Box(tuple(offsets), tuple(sizes))

    # Shuffled so the sort matters; an O(n^2) scan does 2e8 comparisons here.
    order = list(range(n))
    np.random.default_rng(0).shuffle(order)
    boxes = [shard(i) for i in order]
    start = time.perf_counter()
    assert find_overlap(boxes) is None
    clash = n // 2
    boxes.append(shard(order[clash], width=2))
    pair = find_overlap(boxes)
    elapsed = time.perf_counter() - start
    assert pair is not None and pair[1] == n
    assert intersect(boxes[pair[0]], boxes[pair[1]]) is not None
    assert elapsed < 5.0, f"find_overlap took {elapsed:.2f}s for {n} shards"


# --------------------------------------------------------------------------- split_evenly


def test_split_evenly_matches_torch() -> None:
    """Against torch.chunk, and DTensor's Shard where this torch has it."""
    try:
        from torch.distributed.tensor import Shard

        shard_sizes_and_offsets = Shard.local_shard_size_and_offset
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        shard_sizes_and_offsets = None
    for size in range(41):
        for parts in range(1, 9):
            pieces = torch.chunk(torch.arange(size), parts)
            assert len(pieces) <= parts
            position = 0
            for index in range(parts):
                offset, length = split_evenly(size, parts, index)
                piece = pieces[index] if index < len(pieces) else torch.arange(0)
                assert length == piece.numel(), (size, parts, index)
                if length:
                    assert offset == int(piece[0])
                assert offset == position  # the parts tile [0, size) in order
                position += length
                if shard_sizes_and_offsets:
                    assert (length, offset) == shard_sizes_and_offsets(size, parts, index)
            assert position == size


@pytest.mark.parametrize(("size", "parts", "index"), [(-1, 2, 0), (4, 0, 0), (4, 2, 2), (4, 2, -1)])
def test_split_evenly_errors(size: int, parts: int, index: int) -> None:
    with pytest.raises(ValueError):
        split_evenly(size, parts, index)


# --------------------------------------------------------------------------- strides / byte runs


@given(shapes)
def test_strides_match_torch_and_numpy(shape: tuple[int, ...]) -> None:
    strides = strides_for(shape)
    assert strides == tuple(torch.empty(shape).stride())
    if 0 not in shape:
        assert strides == tuple(s // 8 for s in np.empty(shape, dtype=np.float64).strides)


def test_strides_for_rejects_negative() -> None:
    with pytest.raises(ValueError):
        strides_for((2, -1))


@given(shape_and_box(), itemsizes)
def test_byte_runs_match_brute_force(case: tuple[tuple[int, ...], Box], itemsize: int) -> None:
    shape, region = case
    runs = byte_runs(shape, region, itemsize)
    assert runs == brute_runs(shape, region, itemsize)
    # Canonical form: increasing, positive lengths, never touching (merged).
    assert all(length > 0 for _, length in runs)
    for (a, la), (b, _) in itertools.pairwise(runs):
        assert a + la < b


@given(shape_and_box(), itemsizes, st.randoms(use_true_random=False))
def test_byte_runs_read_the_region_bytes(
    case: tuple[tuple[int, ...], Box], itemsize: int, rng: random.Random
) -> None:
    """Reading the runs from a chunk's raw bytes yields the region's bytes, in
    row-major order."""
    shape, region = case
    seed = rng.getrandbits(32)
    data = np.random.default_rng(seed).integers(0, 256, size=(*shape, itemsize), dtype=np.uint8)
    raw = data.tobytes()
    got = b"".join(
        raw[offset : offset + length] for offset, length in byte_runs(shape, region, itemsize)
    )
    assert got == data[slices(region)].tobytes()


@given(shape_and_box())
def test_is_contiguous_means_one_run(case: tuple[tuple[int, ...], Box]) -> None:
    shape, region = case
    assert is_contiguous(shape, region) == (len(byte_runs(shape, region, 1)) <= 1)


def test_byte_runs_cases() -> None:
    assert byte_runs((), Box((), ()), 4) == [(0, 4)]
    assert is_contiguous((), Box((), ()))
    assert byte_runs((3, 0), Box((0, 0), (3, 0)), 4) == []
    assert byte_runs((4, 5), Box((1, 0), (2, 5)), 2) == [(10, 20)]
    assert byte_runs((4, 5), Box((1, 1), (2, 3)), 1) == [(6, 3), (11, 3)]
    assert not is_contiguous((4, 5), Box((1, 1), (2, 3)))
    assert is_contiguous((4, 5), Box((1, 1), (1, 3)))
    for bad in [Box((0, 3), (1, 3)), Box((4, 0), (1, 1)), Box((0,), (1,))]:
        with pytest.raises(ValueError):
            byte_runs((4, 5), bad, 1)
        with pytest.raises(ValueError):
            is_contiguous((4, 5), bad)
    with pytest.raises(ValueError):
        byte_runs((4, 5), Box((0, 0), (1, 1)), 0)


@pytest.mark.timeout(30)
def test_byte_runs_work_per_run_not_per_element() -> None:
    big = 10**9
    # 1e18 elements, one contiguous block: element-by-element would never finish.
    assert byte_runs((big, big), Box((5, 0), (big - 5, big)), 8) == [
        (5 * big * 8, (big - 5) * big * 8)
    ]
    assert is_contiguous((big, big), Box((5, 0), (big - 5, big)))
    # One run per outer index when the last dim is cut.
    runs = byte_runs((3, big), Box((0, 10), (3, 5)), 2)
    assert runs == [((r * big + 10) * 2, 10) for r in range(3)]
    # Full trailing dims merge into the first cut dim's block.
    runs = byte_runs((2, 6, big), Box((0, 1, 0), (2, 2, big)), 1)
    assert runs == [(big, 2 * big), (7 * big, 2 * big)]
    # A 1-element outer extent adds no runs.
    assert byte_runs((7, 4, big), Box((3, 0, 0), (1, 4, big)), 1) == [(3 * 4 * big, 4 * big)]


# --------------------------------------------------------------------------- covering / coalescing


@given(run_lists())
def test_covering_range_spans_all_runs(runs: list[tuple[int, int]]) -> None:
    start, length = covering_range(runs)
    if not runs:
        assert (start, length) == (0, 0)
        return
    assert start == min(o for o, _ in runs)
    assert start + length == max(o + n for o, n in runs)
    assert run_bytes(runs) <= set(range(start, start + length))


@given(shape_and_box(nonempty=True), itemsizes)
def test_covering_range_of_byte_runs(case: tuple[tuple[int, ...], Box], itemsize: int) -> None:
    shape, region = case
    indices = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)[slices(region)]
    first, last = int(indices.min()), int(indices.max())
    expected = (first * itemsize, (last - first + 1) * itemsize)
    assert covering_range(byte_runs(shape, region, itemsize)) == expected


def test_covering_range_rejects_negative() -> None:
    with pytest.raises(ValueError):
        covering_range([(0, 4), (-1, 2)])


@given(run_lists(), st.integers(0, 10))
def test_coalesce_runs(runs: list[tuple[int, int]], max_gap: int) -> None:
    reads = coalesce_runs(runs, max_gap)
    wanted = run_bytes(runs)
    # Sorted, disjoint, separated by gaps wider than max_gap, none empty.
    assert all(length > 0 for _, length in reads)
    for (a, la), (b, _) in itertools.pairwise(reads):
        assert b - (a + la) > max_gap
    # Every input run lies inside a single read.
    for offset, length in runs:
        if length:
            assert any(r <= offset and offset + length <= r + n for r, n in reads)
    # Reads start and end on wanted bytes and never span a gap wider than max_gap.
    for r, n in reads:
        assert r in wanted and r + n - 1 in wanted
        gap = 0
        for b in range(r, r + n):
            gap = 0 if b in wanted else gap + 1
            assert gap <= max_gap
    # Never fewer reads than needed: with the gap unbounded, one read if anything.
    if wanted:
        assert coalesce_runs(runs, 10**9) == [covering_range([x for x in runs if x[1]])]
    else:
        assert reads == []


def test_coalesce_runs_cases() -> None:
    runs = [(20, 4), (0, 4), (4, 4), (10, 2)]
    assert coalesce_runs(runs, 0) == [(0, 8), (10, 2), (20, 4)]
    assert coalesce_runs(runs, 2) == [(0, 12), (20, 4)]
    assert coalesce_runs(runs, 8) == [(0, 24)]
    assert coalesce_runs([(0, 10), (2, 3)], 0) == [(0, 10)]  # overlap is merged
    with pytest.raises(ValueError):
        coalesce_runs(runs, -1)
    with pytest.raises(ValueError):
        coalesce_runs([(-4, 2)], 0)
