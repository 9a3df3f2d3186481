"""Global save planning on synthetic plans (``bench.synthetic_plans``), and the
planning benchmark in its quick mode.

The coordinator's ``create_global_plan`` must, for FSDP-style plans (every
tensor ``Shard(0)`` over all ranks, uneven, some ranks holding empty shards),
keep every chunk on the rank that holds it and record chunks that tile every
tensor; for DDP-style plans (every rank holds every full tensor) write each
tensor exactly once, with the bytes balanced: the greedy largest-first
assignment onto the least loaded rank never leaves a rank more than one
largest item above the mean, ``max ≤ total / R + largest``.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner as DcpSavePlanner

from distcp.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from distcp.planner import SavePlan, item_nbytes
from distcp.save_planner import DefaultSavePlanner

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.synthetic_plans import (  # noqa: E402
    VALUES,
    TensorSpec,
    dcp_plans,
    distcp_plans,
    model_tensors,
    shard0,
)

RANKS = 16
TENSORS = 20
# Small tensors so that 16 ranks leave some of them empty shards (10 rows: 6 ranks
# empty), and a 0-row one (every rank empty).
EXTRA = [
    TensorSpec("small.weight", (10, 3), torch.float32),
    TensorSpec("tiny.bias", (5,), torch.bfloat16),
    TensorSpec("empty.weight", (0, 4), torch.float32),
]


def _plan(plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    planner = DefaultSavePlanner()
    planner.set_up_planner({}, storage_meta=None, is_coordinator=True)
    return planner.create_global_plan(plans)


def _nbytes(item: object) -> int:
    return item_nbytes(item)  # type: ignore[arg-type]


def _written(plans: list[SavePlan]) -> dict[tuple[str, tuple[int, ...] | None], list[int]]:
    writers: dict[tuple[str, tuple[int, ...] | None], list[int]] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            writers.setdefault((item.index.fqn, item.index.offset), []).append(rank)
    return writers


def test_sharded_chunks_tile_every_tensor_and_stay_on_their_rank() -> None:
    specs = model_tensors(TENSORS) + EXTRA
    local = distcp_plans(RANKS, specs, "sharded")
    plans, metadata = _plan(local)

    writers = _written(plans)
    assert all(len(ranks) == 1 for ranks in writers.values()), "an item written twice"
    for spec in specs:
        entry = metadata.state_dict_metadata[spec.key]
        assert isinstance(entry, TensorStorageMetadata)
        assert tuple(entry.size) == spec.shape and entry.properties.dtype == spec.dtype
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        assert boxes == sorted(boxes), "chunks not sorted by offsets"
        expected = {shard0(spec.shape, RANKS, rank) for rank in range(RANKS)}
        assert set(boxes) == expected and len(boxes) == len(expected)
        # tiling: the volumes add up and no two non-empty chunks share an element
        assert sum(math.prod(sizes) for _, sizes in boxes) == math.prod(spec.shape)
        for (oa, sa), (ob, sb) in itertools.combinations(boxes, 2):
            assert any(
                max(a, b) >= min(a + m, b + n) for a, m, b, n in zip(oa, sa, ob, sb, strict=True)
            ), f"{spec.key}: {oa, sa} overlaps {ob, sb}"
        for rank in range(RANKS):
            offsets, sizes = shard0(spec.shape, RANKS, rank)
            holder = writers[(spec.key, offsets)][0]
            if math.prod(sizes):  # a real shard is written by the rank holding it
                assert holder == rank
            else:  # the empty shard: one writer among the ranks holding one
                assert math.prod(shard0(spec.shape, RANKS, holder)[1]) == 0
    for key, _ in VALUES:  # values from the lowest rank
        assert isinstance(metadata.state_dict_metadata[key], BytesStorageMetadata)
        assert writers[(key, None)] == [0]

    # torch DCP's planner on the same plans in its types agrees chunk for chunk.
    _, dcp_metadata = DcpSavePlanner().create_global_plan(dcp_plans(RANKS, specs, "sharded"))
    for spec in specs:
        ours = metadata.state_dict_metadata[spec.key]
        theirs = dcp_metadata.state_dict_metadata[spec.key]
        assert isinstance(ours, TensorStorageMetadata)
        assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in ours.chunks) == sorted(
            (tuple(c.offsets), tuple(c.sizes))
            for c in theirs.chunks  # type: ignore[union-attr]
        )


@pytest.mark.parametrize("ranks", [4, RANKS])
def test_replicated_written_once_with_bytes_balanced(ranks: int) -> None:
    specs = model_tensors(TENSORS) + EXTRA
    plans, metadata = _plan(distcp_plans(ranks, specs, "replicated"))

    writers = _written(plans)
    assert sorted(writers) == sorted(
        [(s.key, (0,) * len(s.shape)) for s in specs] + [(key, None) for key, _ in VALUES]
    )
    assert all(len(ranks) == 1 for ranks in writers.values()), "an item written twice"
    for spec in specs:
        entry = metadata.state_dict_metadata[spec.key]
        assert isinstance(entry, TensorStorageMetadata)
        assert [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks] == [
            ((0,) * len(spec.shape), spec.shape)
        ]

    loads = [sum(_nbytes(item) for item in plan.items) for plan in plans]
    sizes = [math.prod(s.shape) * s.dtype.itemsize for s in specs]
    total = sum(sizes) + sum(nbytes for _, nbytes in VALUES)
    assert sum(loads) == total
    assert max(loads) <= total / ranks + max(sizes), loads
    # and every rank writes something as long as there are items enough
    assert sum(1 for load in loads if load) == min(ranks, len([s for s in sizes if s]))


def test_planning_benchmark_quick_mode_runs_in_seconds(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "bench.planning_scale", "--quick", "--out", str(tmp_path)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < 20, f"--quick took {elapsed:.1f} s"
    results = json.loads((tmp_path / "planning.json").read_text())
    assert (tmp_path / "planning.md").read_text().startswith("# Save planning at scale")
    assert [c["layout"] for c in results["main"]] == ["sharded", "replicated"]
    assert len(results["series"]) == 5
    for case in results["main"] + results["series"]:
        for library in ("distcp", "torch_dcp"):
            record = case[library]
            assert record["seconds"] > 0
            assert record["chunks_in_metadata"] >= case["tensors"]
        # both libraries write the same items and bytes
        assert case["distcp"]["items_written"] == case["torch_dcp"]["items_written"]
        assert case["distcp"]["bytes_written"] == case["torch_dcp"]["bytes_written"]
