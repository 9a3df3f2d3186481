"""distcp.tiling against brute force: the sweep, the corner count and their
combination agree with counting, element by element, how often each element
is covered; grids of chunks take the corner path without quadratic work."""

from __future__ import annotations

import itertools
import math
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from distcp.tiling import _tiles_by_corners, find_repeated, tiling_problem


def coverage(
    offsets: list[tuple[int, ...]], sizes: list[tuple[int, ...]]
) -> Counter[tuple[int, ...]]:
    counts: Counter[tuple[int, ...]] = Counter()
    for start, size in zip(offsets, sizes, strict=True):
        counts.update(
            itertools.product(*(range(o, o + s) for o, s in zip(start, size, strict=True)))
        )
    return counts


def exact(
    offsets: list[tuple[int, ...]], sizes: list[tuple[int, ...]], shape: tuple[int, ...]
) -> bool:
    counts = coverage(offsets, sizes)
    return len(counts) == math.prod(shape) and set(counts.values()) <= {1}


@st.composite
def layouts(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], tuple[int, ...]]:
    """Random boxes inside a small shape: often a tiling (a random grid),
    often a damaged one, sometimes anything."""
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    cuts = [
        sorted(set(draw(st.lists(st.integers(1, dim - 1), max_size=3)) if dim > 1 else []))
        for dim in shape
    ]
    edges = [[0, *c, dim] for c, dim in zip(cuts, shape, strict=True)]
    offsets, sizes = [], []
    for cell in itertools.product(*(range(len(e) - 1) for e in edges)):
        offsets.append(tuple(edges[d][i] for d, i in enumerate(cell)))
        sizes.append(tuple(edges[d][i + 1] - edges[d][i] for d, i in enumerate(cell)))
    damage = draw(st.sampled_from(["none", "drop", "grow", "duplicate", "random"]))
    if damage == "drop" and len(offsets) > 1:
        del offsets[-1], sizes[-1]
    elif damage == "grow":
        n = draw(st.integers(0, len(sizes) - 1))
        d = draw(st.integers(0, ndim - 1))
        if offsets[n][d] + sizes[n][d] < shape[d]:
            sizes[n] = tuple(s + (k == d) for k, s in enumerate(sizes[n]))
    elif damage == "duplicate":
        offsets.append(offsets[0])
        sizes.append(sizes[0])
    elif damage == "random":
        offsets, sizes = [], []
        for _ in range(draw(st.integers(0, 6))):
            start = tuple(draw(st.integers(0, dim - 1)) for dim in shape)
            offsets.append(start)
            sizes.append(
                tuple(draw(st.integers(0, dim - o)) for o, dim in zip(start, shape, strict=True))
            )
    return offsets, sizes, shape


@settings(max_examples=400, deadline=None)
@given(layouts())
def test_every_path_agrees_with_brute_force(
    layout: tuple[list[tuple[int, ...]], list[tuple[int, ...]], tuple[int, ...]],
) -> None:
    offsets, sizes, shape = layout
    truth = exact(offsets, sizes, shape)
    assert (tiling_problem(offsets, sizes, shape) is None) == truth
    assert _tiles_by_corners(offsets, sizes, shape) == truth
    problem = tiling_problem(offsets, sizes, shape)
    if problem is not None and problem.pair is not None:
        i, j = problem.pair
        shared = coverage([offsets[i]], [sizes[i]]) & coverage([offsets[j]], [sizes[j]])
        assert shared, "the pair named does overlap"


def test_a_grid_is_checked_by_corners_and_a_moved_chunk_found() -> None:
    grid_offsets = [(10 * i, 10 * j) for i in range(60) for j in range(60)]
    sizes = [(10, 10)] * len(grid_offsets)
    assert tiling_problem(grid_offsets, sizes, (600, 600)) is None
    moved = [*grid_offsets[:-1], (590, 585)]
    problem = tiling_problem(moved, sizes, (600, 600))
    assert problem is not None and problem.kind == "overlap"
    assert "overlap" in problem.describe(600 * 600)


def test_many_split_dims_get_a_longer_sweep_and_past_it_are_refused() -> None:
    small = list(itertools.product((0, 1), repeat=8))
    assert _tiles_by_corners(small, [(1,) * 8] * len(small), (2,) * 8) is None  # not attempted
    assert tiling_problem(small, [(1,) * 8] * len(small), (2,) * 8) is None  # the longer sweep
    large = list(itertools.product((0, 1, 2), repeat=8))
    problem = tiling_problem(large, [(1,) * 8] * len(large), (3,) * 8)
    assert problem is not None and problem.kind == "too-complex"
    assert "more than 6 dimensions" in problem.describe(3**8)


def test_repeated_offsets_are_found_by_sorting() -> None:
    assert find_repeated([(0, 1), (2, 3), (0, 1)]) == (0, 2)
    assert find_repeated([(0, 1), (2, 3)]) is None
