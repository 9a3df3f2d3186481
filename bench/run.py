"""Benchmark distcp against torch DCP, torch.save and the hardware, in one run.

    python -m bench.run [--size-gib 1] [--rounds 5] [--scenarios a,b,c,d] [--dir DIR]

Scenarios: (a) 64 tensors as DTensor Shard(0) on 2 ranks: save, load into the
same layout, into Shard(1), and on 1 rank; (b) many small tensors on 1 rank:
save and load; (c) DDP-style replicated state on 2 ranks: save and load;
(d) scenario a's loads with a warm and a cold page cache. Results go to
``bench/results/latest.json`` and ``latest.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the ``bench`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rank_tasks, report
from bench.measure import Eviction, Summary, abba, evict, probe_eviction
from bench.peers import PEERS
from bench.scenarios import SCENARIOS, Phase, Scenario, build_scenarios, small_count_for
from distcp.testing import RankPool

LIBRARIES = [
    "distcp",
    "distcp-async",
    "distcp-async-proc",
    "torch-dcp",
    "torch.save",
    "raw",
    "memcpy",
]
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size-gib", type=float, default=1.0, help="state size (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--scenarios", default="a,b,c,d", help="comma-separated letters (default a,b,c,d)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="parent of the temporary checkpoint directory"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="I/O threads per rank (default: min(4, CPUs), distcp's default)",
    )
    parser.add_argument(
        "--small-count",
        type=int,
        default=None,
        help="scenario b's tensor count (default 10,000 per GiB of --size-gib, at least 100)",
    )
    parser.add_argument(
        "--libraries",
        default=",".join(LIBRARIES),
        help=f"comma-separated subset of {','.join(LIBRARIES)}",
    )
    parser.add_argument(
        "--cold-method",
        choices=["auto", "fadvise", "drop_caches", "none"],
        default="auto",
        help="how cold loads empty the page cache (auto: fadvise, else drop_caches)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.json/.md go")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_gib <= 0 or args.threads < 1:
        parser.error("--rounds, --size-gib and --threads must be positive")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.libraries = [s.strip() for s in args.libraries.split(",") if s.strip()]
    if "distcp" not in args.libraries or set(args.libraries) - set(LIBRARIES):
        parser.error(f"--libraries must include distcp and come from {LIBRARIES}")
    if set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios must come from {','.join(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    size = int(args.size_gib * 2**30)
    small_count = args.small_count or small_count_for(size)
    scenarios = build_scenarios(args.scenarios, size, small_count)
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="distcp-bench-", dir=parent))
    began = time.perf_counter()
    try:
        cold = probe_eviction(workdir, args.cold_method)
        results: dict[str, Any] = {
            "command": shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "libraries": args.libraries,
            "settings": {
                "size_gib": args.size_gib,
                "rounds": args.rounds,
                "scenarios": args.scenarios,
                "threads": args.threads,
                "small_count": small_count,
                "cold_method": args.cold_method,
                "dir": str(parent),
            },
            "machine": report.machine(workdir),
            "cold_cache": _cold_description(cold, args.cold_method),
            "scenarios": [],
        }
        world = max(s.ranks for s in scenarios)
        _progress(f"benchmark in {workdir} on {world} ranks")
        with RankPool(world, collective_timeout_s=900.0, run_timeout_s=900.0) as pool:
            results["rss_method"] = pool.run(rank_tasks.start)[0]
            results["settings"]["torch_threads"] = pool.run(rank_tasks.torch_threads)[0]
            for scenario in scenarios:
                results["scenarios"].append(
                    _run_scenario(pool, scenario, args, workdir / scenario.name, cold)
                )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - began, 1)
    results["notes"] = _notes(args)
    json_path, md_path = report.write(results, args.out)
    report.print_summary(results)
    print(f"\nwrote {json_path} and {md_path} in {results['seconds']} s", file=sys.stderr)
    failed = [
        f"{s['name']}: {p['name']}: {lib}"
        for s in results["scenarios"]
        for p in s["phases"]
        for lib, r in p.get("results", {}).items()
        if r.get("error") or r.get("verified") is False
    ]
    if failed:
        print("FAILED or not bit-exact: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


_STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def _run_scenario(
    pool: RankPool, scenario: Scenario, args: argparse.Namespace, directory: Path, cold: Eviction
) -> dict[str, Any]:
    _progress(f"scenario {scenario.name}: {scenario.title}")
    pool.run(rank_tasks.set_up_scenario, scenario)
    phases = []
    try:
        for phase in scenario.phases:
            phases.append(_run_phase(pool, scenario, phase, args, directory, cold))
    finally:
        pool.run(rank_tasks.tear_down)
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "name": scenario.name,
        "title": scenario.title,
        "tensors": len(scenario.specs),
        "bytes": scenario.nbytes,
        "ranks": scenario.ranks,
        "save_layout": scenario.save_layout.describe(),
        "phases": phases,
    }


def _run_phase(
    pool: RankPool,
    scenario: Scenario,
    phase: Phase,
    args: argparse.Namespace,
    directory: Path,
    cold: Eviction,
) -> dict[str, Any]:
    libraries = [lib for lib in args.libraries if phase.op in PEERS[lib].ops]
    summary: dict[str, Any] = {
        "name": phase.name,
        "op": phase.op,
        "layout": phase.layout.describe(),
        "cache": phase.cache,
        "timed": phase.timed,
        "bytes": scenario.phase_bytes(phase),
        "results": {},
        "ratios": {},
    }
    if phase.cache == "cold" and cold.method == "none":
        summary["skipped"] = "cold not measured"
        return summary
    _progress(f"  {phase.name} ({phase.layout.describe()})")
    pool.run(rank_tasks.set_up_phase, scenario, phase, "memcpy" in libraries)
    records: dict[str, dict[str, Any]] = {lib: {"runs": []} for lib in libraries}

    def op(lib: str, task: Any = rank_tasks.run_op) -> dict[str, Any]:
        path = directory / lib
        if phase.op == "save":  # every save starts from an empty directory
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        outcome = pool.run(task, lib, scenario, phase, str(path), args.threads)
        errors = [r["facts"]["error"] for r in outcome if "error" in r["facts"]]
        if errors:
            records[lib]["error"] = errors[0]
        return {
            "seconds": max(r["seconds"] for r in outcome),
            "rss_extra": [r["rss_extra"] for r in outcome],
            "facts": [r["facts"] for r in outcome],
            "mismatched": [r.get("mismatched") for r in outcome],
        }

    # One untimed op per library: writes the checkpoint later phases load (saves),
    # warms the cache and checks the loaded bytes (loads).
    for lib in libraries:
        first = op(lib, rank_tasks.run_checked_op)
        records[lib]["facts"] = first["facts"]
        if phase.op == "load" and "error" not in records[lib]:
            _verify(records[lib], first["facts"], first["mismatched"])
    if phase.timed:
        alive = [lib for lib in libraries if "error" not in records[lib]]
        worst_resident = 0.0
        for round_index in range(args.rounds):
            for lib in abba(alive, round_index):
                if phase.cache == "cold":
                    eviction = evict(directory / lib, cold.method)
                    worst_resident = max(worst_resident, eviction.resident)
                run = op(lib)
                records[lib]["runs"].append(run)
                records[lib]["facts"] = run["facts"]
        if phase.cache == "cold":
            summary["cold_method"] = cold.method
            summary["cold_resident"] = worst_resident
    for lib in libraries:
        summary["results"][lib] = _summarise(records[lib], summary["bytes"], phase)
    distcp = summary["results"].get("distcp", {})
    for lib in libraries:
        other = summary["results"][lib]
        if phase.timed and "median_s" in distcp and "median_s" in other:
            summary["ratios"][lib] = other["median_s"] / distcp["median_s"]
        if "blocking_median_s" in other and "median_s" in distcp:
            other["blocking_vs_sync_save"] = other["blocking_median_s"] / distcp["median_s"]
    return summary


def _verify(
    record: dict[str, Any], facts: list[dict[str, Any]], mismatched: list[list[str] | None]
) -> None:
    exact = all(f.get("exact", True) for f in facts)
    record["exact"] = exact
    if not exact:
        record["verified"] = None
        record["verify_note"] = "n/a: moves the bytes, does not reshard"
        return
    keys = sorted({key for rank_keys in mismatched for key in rank_keys or []})
    record["verified"] = not keys
    record["mismatched_keys"] = keys


def _summarise(record: dict[str, Any], nbytes: int, phase: Phase) -> dict[str, Any]:
    out: dict[str, Any] = {
        key: record[key]
        for key in ("error", "exact", "verified", "verify_note", "mismatched_keys")
        if key in record
    }
    if phase.op == "load" and "verified" not in out and "error" not in out:
        out["verified"] = None
    facts = record.get("facts") or []
    if any("bytes_needed" in f for f in facts):
        needed = sum(f.get("bytes_needed", 0) for f in facts)
        read = sum(f.get("bytes_read", 0) for f in facts)
        out["report"] = {
            "bytes_needed": needed,
            "bytes_read": read,
            "bytes_verified": sum(f.get("bytes_verified", 0) for f in facts),
            "read_amplification": read / needed if needed else 1.0,
            "per_rank": [f for f in facts if "bytes_needed" in f],
        }
    runs = record["runs"]
    if not runs or "error" in record:
        return out
    blocking = [
        max(f["blocking_s"] for f in run["facts"] if "blocking_s" in f)
        for run in runs
        if any("blocking_s" in f for f in run["facts"])
    ]
    if blocking:
        out["blocking_median_s"] = Summary.of(blocking).median
    seconds = Summary.of([r["seconds"] for r in runs])
    peaks = [max(r["rss_extra"]) for r in runs]
    out.update(
        {
            "seconds": [r["seconds"] for r in runs],
            "median_s": seconds.median,
            "min_s": seconds.minimum,
            "max_s": seconds.maximum,
            "gbps": nbytes / seconds.median / 1e9,
            "rss_extra_bytes": [r["rss_extra"] for r in runs],
            "rss_extra_median_bytes": Summary.of(peaks).median,
            "rss_extra_max_bytes": max(peaks),
        }
    )
    return out


def _cold_description(cold: Eviction, asked: str) -> dict[str, Any]:
    if cold.method == "none":
        detail = (
            "not asked for"
            if asked == "none"
            else f"neither posix_fadvise nor drop_caches emptied the cache ({cold.resident:.0%}"
            " of a probe file stayed resident)"
        )
    elif cold.method == "fadvise":
        detail = "fsync + posix_fadvise(DONTNEED) on every checkpoint file; mincore checks it"
    else:
        detail = "sync; echo 3 > /proc/sys/vm/drop_caches; mincore checks it"
    return {"method": cold.method, "detail": detail}


def _notes(args: argparse.Namespace) -> list[str]:
    return [
        "distcp: FileSystemWriter(thread_count=T, sync_files=True) /"
        " FileSystemReader(thread_count=T), checksums written and verified.",
        "torch-dcp: torch.distributed.checkpoint.save/load with its FileSystemWriter"
        " (thread_count=T, sync_files=True) and FileSystemReader (no thread option: one thread).",
        "torch.save: one file per rank ({key: local tensor} and the boxes they cover), flushed"
        " and fsynced; replicated state is saved by rank 0 alone, as DDP code does. Loads use"
        " torch.load(mmap=True, weights_only=True) on every rank's file and copy the overlap"
        " of each saved box with each requested box (so it reshards).",
        "raw (saves): os.write of each rank's tensor bytes into T files per rank, one per"
        " thread, starting writeback (sync_file_range) every 16 MiB as distcp does, then"
        " fsync; replicated state is written once, split across ranks by bytes.",
        "raw (loads): os.preadv on T threads straight into the tensors when every piece is one"
        " contiguous run of a file and of a tensor; for Shard(1) it reads the same number of"
        " bytes sequentially instead (the time to move the bytes, not a correct load).",
        "memcpy: copy of the bytes a rank needs from one in-memory buffer into its tensors,"
        " on T threads.",
        "Scenario b and the 1-rank load run on rank 0 alone (distcp and DCP with no_dist=True);"
        " the other rank only joins the barriers.",
        "Peak RSS counts resident pages of mapped files too: torch.load(mmap=True) touches"
        " every page of its file, so torch.save's load peak is about the bytes it loads.",
        "Every save starts from an empty directory (deleted outside the timed part); warm"
        " loads follow an untimed load of the same checkpoint.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
