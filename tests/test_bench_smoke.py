"""The benchmark runs end to end at a tiny size and reports what it should.

No timing is asserted: only that every library ran every phase of the scenarios
asked for, produced positive numbers, and that each load the benchmark checks
came back bit-exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = {
    "distcp",
    "distcp-async",
    "distcp-async-proc",
    "torch-dcp",
    "torch.save",
    "raw",
    "memcpy",
}


def test_bench_runs_and_verifies(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "bench.run",
        "--size-gib",
        str(4 / 1024),
        "--rounds",
        "1",
        "--scenarios",
        "a,b",
        "--dir",
        str(tmp_path / "checkpoints"),
        "--out",
        str(tmp_path / "results"),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert (tmp_path / "results" / "latest.md").read_text().startswith("# distcp benchmark")
    assert list((tmp_path / "checkpoints").iterdir()) == []  # cleaned up

    assert set(results["libraries"]) == LIBRARIES
    assert [s["name"] for s in results["scenarios"]] == ["a", "b"]
    assert results["machine"]["torch"] and results["machine"]["target_filesystem"]["type"]
    for scenario in results["scenarios"]:
        for phase in scenario["phases"]:
            where = f"{scenario['name']}: {phase['name']}"
            expected = (
                LIBRARIES - {"distcp-async", "distcp-async-proc"}
                if phase["op"] == "load"
                else LIBRARIES - {"memcpy"}
            )
            assert set(phase["results"]) == expected, where
            assert phase["bytes"] > 0, where
            for lib, record in phase["results"].items():
                assert "error" not in record, (where, lib, record.get("error"))
                assert record["median_s"] > 0 and record["gbps"] > 0, (where, lib)
                assert len(record["seconds"]) == 1, (where, lib)
                assert all(b >= 0 for run in record["rss_extra_bytes"] for b in run)
                if phase["op"] == "load":
                    if lib == "raw" and "Shard(1)" in phase["layout"]:
                        assert record["verified"] is None  # moves the bytes, cannot reshard
                    else:
                        assert record["verified"] is True, (where, lib)
            assert phase["ratios"]["distcp"] == 1.0
            if phase["op"] == "save":  # the async save's blocking part is reported
                for lib in ("distcp-async", "distcp-async-proc"):
                    assert phase["results"][lib]["blocking_median_s"] > 0, (where, lib)
            assert all(r > 0 for r in phase["ratios"].values()), where
            if phase["op"] == "load":
                report = phase["results"]["distcp"]["report"]
                assert report["bytes_needed"] == phase["bytes"], where
                assert report["bytes_read"] >= report["bytes_needed"], where


def test_object_store_bench_runs_and_verifies(tmp_path: Path) -> None:
    """The object-store benchmark at its smallest: every library, every
    phase, each load checked bit-exact (the benchmark exits 1 otherwise),
    and distcp's transfer for the DDP → FSDP reshard is what it needs."""
    command = [sys.executable, "-m", "bench.object_store", "--size-mib", "32"]
    command += ["--rounds", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "object_store.json").read_text())
    phases = {row["phase"]: row for row in results["phases"]}
    assert len(phases) == 5
    for row in phases.values():
        assert row["distcp"]["median_s"] > 0 and row["torch-dcp"]["median_s"] > 0
    assert "raw" in phases["save Shard(0)"] and "raw" in phases["load Shard(0)"]
    reshard = phases["load replicated → Shard(0)"]
    assert reshard["distcp"]["transfer_vs_needed"] <= 1.05
    assert (tmp_path / "object_store.md").read_text().startswith("# Object storage")
