"""What the benchmark saves and loads: tensors, layouts, phases, and the data itself.

Every tensor is float32 and its contents are a pure function of its seed and the
element's global index (``_pattern``), so any rank can regenerate the expected
bytes of any box of any tensor to verify a load bit for bit, without keeping a
second copy of the state around.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

DTYPE = torch.float32
ITEMSIZE = 4

#: A box inside a tensor: (offsets, sizes), one entry per dimension.
Box = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    seed: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE


@dataclass(frozen=True, slots=True)
class Layout:
    """How a state is laid out across ranks.

    ``shard``: DTensor ``Shard(dim)`` on ``ranks`` ranks; ``replicate``: the same
    plain full tensor on every one of ``ranks`` ranks (DDP); ``single``: plain
    full tensors on rank 0 alone (the other ranks sit the phase out).
    """

    kind: Literal["shard", "replicate", "single"]
    ranks: int
    dim: int = 0

    def describe(self) -> str:
        if self.kind == "shard":
            return f"Shard({self.dim}) on {self.ranks} ranks"
        if self.kind == "replicate":
            return f"replicated on {self.ranks} ranks"
        return "full tensors on 1 rank"

    def box(self, spec: TensorSpec, rank: int) -> Box | None:
        """The part of ``spec`` that ``rank`` holds, or None if it holds nothing."""
        full: Box = (tuple(0 for _ in spec.shape), spec.shape)
        if self.kind == "single":
            return full if rank == 0 else None
        if rank >= self.ranks:
            return None
        if self.kind == "replicate":
            return full
        size = spec.shape[self.dim]
        step = -(-size // self.ranks)  # torch.chunk's (and DTensor's) split
        start, stop = min(rank * step, size), min((rank + 1) * step, size)
        offsets = list(full[0])
        sizes = list(spec.shape)
        offsets[self.dim], sizes[self.dim] = start, stop - start
        return tuple(offsets), tuple(sizes)

    def active(self, rank: int) -> bool:
        return rank == 0 if self.kind == "single" else rank < self.ranks

    def bytes_on(self, specs: list[TensorSpec], rank: int) -> int:
        total = 0
        for spec in specs:
            box = self.box(spec, rank)
            if box is not None:
                total += math.prod(box[1]) * ITEMSIZE
        return total


@dataclass(frozen=True, slots=True)
class Phase:
    """One measured operation of a scenario."""

    name: str
    op: Literal["save", "load"]
    layout: Layout
    cache: Literal["warm", "cold"] = "warm"
    timed: bool = True


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    specs: list[TensorSpec] = field(hash=False)
    save_layout: Layout
    phases: list[Phase] = field(hash=False)

    @property
    def ranks(self) -> int:
        return max([self.save_layout.ranks] + [p.layout.ranks for p in self.phases])

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs)

    def phase_bytes(self, phase: Phase) -> int:
        """Bytes the phase moves: the unique state for a save (replicas count
        once), the bytes landing in every rank's tensors for a load."""
        if phase.op == "save":
            return self.nbytes
        return sum(phase.layout.bytes_on(self.specs, r) for r in range(phase.layout.ranks))


SCENARIOS = "abcd"


def build_scenarios(
    names: str | list[str], size_bytes: int, small_count: int, ranks: int = 2
) -> list[Scenario]:
    """The scenarios named (letters of ``SCENARIOS``), sized to ``size_bytes``."""
    large = _large_tensors(size_bytes)
    shard0 = Layout("shard", ranks, 0)
    shard1 = Layout("shard", ranks, 1)
    single = Layout("single", 1)
    replicated = Layout("replicate", ranks)
    catalogue = {
        "a": Scenario(
            "a",
            f"{len(large)} tensors, DTensor Shard(0) on {ranks} ranks",
            large,
            shard0,
            [
                Phase("save", "save", shard0),
                Phase("load, same layout", "load", shard0),
                Phase("load into Shard(1) (resharding)", "load", shard1),
                Phase("load on 1 rank (full tensors)", "load", single),
            ],
        ),
        "b": Scenario(
            "b",
            f"{small_count} small tensors (1-256 KiB) on 1 rank",
            _small_tensors(small_count),
            single,
            [Phase("save", "save", single), Phase("load", "load", single)],
        ),
        "c": Scenario(
            "c",
            f"{len(large)} tensors replicated on {ranks} ranks (DDP)",
            large,
            replicated,
            [Phase("save", "save", replicated), Phase("load", "load", replicated)],
        ),
        "d": Scenario(
            "d",
            f"page cache warm vs cold: scenario a's state, Shard(0) on {ranks} ranks",
            large,
            shard0,
            [
                Phase("save (setup, not timed)", "save", shard0, timed=False),
                Phase("load, same layout, warm cache", "load", shard0, "warm"),
                Phase("load, same layout, cold cache", "load", shard0, "cold"),
                Phase("load into Shard(1), cold cache", "load", shard1, "cold"),
            ],
        ),
    }
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    return [catalogue[n] for n in names]


def _large_tensors(size_bytes: int, count: int = 64) -> list[TensorSpec]:
    """``count`` square-ish float32 matrices totalling about ``size_bytes``; both
    dimensions are multiples of 8 so Shard(0) and Shard(1) split evenly."""
    numel = max(64, size_bytes // count // ITEMSIZE)
    cols = max(8, 2 ** int(math.log2(math.sqrt(numel))))
    rows = max(8, numel // cols // 8 * 8)
    return [TensorSpec(f"layers.{i:02d}.weight", (rows, cols), 1000 + i) for i in range(count)]


def _small_tensors(count: int, seed: int = 5) -> list[TensorSpec]:
    """``count`` 1-D float32 tensors of 1 to 256 KiB (uniform in whole KiB), drawn
    reproducibly from ``seed``."""
    sizes = random.Random(seed).choices(range(1, 257), k=count)
    return [
        TensorSpec(f"small.{i:05d}", (kib * 1024 // ITEMSIZE,), 50_000 + i)
        for i, kib in enumerate(sizes)
    ]


def small_count_for(size_bytes: int, default: int = 10_000) -> int:
    """Scenario b's tensor count: 10,000 at 1 GiB, scaled with the size (at least 100)."""
    return max(100, round(default * size_bytes / 2**30))


# --- data ---------------------------------------------------------------------------


def _pattern(spec: TensorSpec) -> torch.Tensor:
    """The full tensor: element i holds the bits of (seed·2^20 + i)·0x9E3779B1 mod
    2^32, a bijection of i, so a misplaced element or key is always noticed."""
    start = (spec.seed << 20) % 2**31
    bits = torch.arange(start, start + spec.numel, dtype=torch.int32)
    bits.mul_(-1640531535)  # 0x9E3779B1 as int32; the product wraps mod 2^32
    return bits.view(DTYPE).view(spec.shape)


def box_slices(inner: Box, outer: Box) -> tuple[slice, ...]:
    """Slices of ``outer``'s tensor that select ``inner``."""
    return tuple(
        slice(o - oo, o - oo + s) for o, oo, s in zip(inner[0], outer[0], inner[1], strict=True)
    )


def expected(spec: TensorSpec, box: Box) -> torch.Tensor:
    full: Box = (tuple(0 for _ in spec.shape), spec.shape)
    return _pattern(spec)[box_slices(box, full)]


def intersect(a: Box, b: Box) -> Box | None:
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return tuple(offsets), tuple(sizes)


def contiguous_run(inner: Box, outer: Box) -> tuple[int, int] | None:
    """(first element, element count) of ``inner`` inside row-major ``outer`` if
    ``inner`` is one contiguous run of it, else None."""
    ndim = len(outer[1])
    k = ndim - 1
    while k > 0 and inner[0][k] == outer[0][k] and inner[1][k] == outer[1][k]:
        k -= 1
    if any(inner[1][j] != 1 for j in range(k)):
        return None
    start, stride = 0, 1
    for j in reversed(range(ndim)):
        start += (inner[0][j] - outer[0][j]) * stride
        stride *= outer[1][j]
    return start, math.prod(inner[1])


def local_tensor(value: Any) -> torch.Tensor:
    """The tensor holding this rank's bytes: a DTensor's local shard, or the tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        with torch.no_grad():
            return value.to_local()
    assert isinstance(value, torch.Tensor)
    return value


def make_state(
    specs: list[TensorSpec], layout: Layout, rank: int, mesh: Any, *, fill: bool
) -> dict[str, Any]:
    """This rank's state in ``layout``: the pattern when ``fill``, zeros otherwise
    (zeros are written, so the pages are resident before anything is timed)."""
    from torch.distributed.tensor import DTensor, Shard

    state: dict[str, Any] = {}
    for spec in specs:
        box = layout.box(spec, rank)
        if box is None:
            continue
        local = expected(spec, box).clone() if fill else torch.zeros(box[1], dtype=DTYPE)
        if layout.kind == "shard":
            state[spec.key] = DTensor.from_local(
                local,
                mesh,
                [Shard(layout.dim)],
                run_check=False,
                shape=torch.Size(spec.shape),
                stride=_contiguous_strides(spec.shape),
            )
        else:
            state[spec.key] = local
    return state


def verify(specs: list[TensorSpec], layout: Layout, rank: int, state: dict[str, Any]) -> list[str]:
    """Keys whose bytes on this rank differ from what was saved."""
    bad = []
    for spec in specs:
        box = layout.box(spec, rank)
        if box is None:
            continue
        got = local_tensor(state[spec.key])
        want = expected(spec, box)
        if got.shape != want.shape or not torch.equal(
            got.contiguous().view(torch.int32), want.contiguous().view(torch.int32)
        ):
            bad.append(spec.key)
    return bad


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
