"""The machine, and the results as JSON and as a markdown page."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

GIB = 2**30
MIB = 2**20


def machine(target: Path) -> dict[str, Any]:
    """What the numbers were measured on, and where the checkpoints were written."""
    import torch

    cpuinfo = _read("/proc/cpuinfo")
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor() or "unknown",
    )
    cores = {
        (block.get("physical id"), block.get("core id"))
        for block in (
            dict(
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in chunk.splitlines())
            )
            for chunk in cpuinfo.split("\n\n")
            if chunk.strip()
        )
    }
    meminfo = _read("/proc/meminfo")
    ram_kib = next(
        (int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal")), 0
    )
    fs = _filesystem(target)
    usage = os.statvfs(target)
    import distcp

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": len(cores) if cores and None not in next(iter(cores)) else None,
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": round(ram_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distcp": getattr(distcp, "__version__", "unknown"),
        "distcp_commit": _git_commit(),
        "target_dir": str(target),
        "target_filesystem": fs,
        "target_free_gib": round(usage.f_bavail * usage.f_frsize / GIB, 1),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _filesystem(target: Path) -> dict[str, str]:
    """The mount holding ``target`` (the longest mount point that prefixes it)."""
    real = os.path.realpath(target)
    best = {"type": "unknown", "device": "unknown", "mount_point": "/", "options": ""}
    length = -1
    for line in _read("/proc/mounts").splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        device, mount, kind, options = fields[:4]
        mount = mount.replace("\\040", " ")
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > length:
            length = len(mount)
            best = {"type": kind, "device": device, "mount_point": mount, "options": options}
    return best


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+uncommitted changes in src" if dirty else "")


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "latest.json", out / "latest.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path


# --- markdown -----------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    settings, host = results["settings"], results["machine"]
    libraries = results["libraries"]
    peers = [lib for lib in libraries if lib != "distcp"]
    fs = host["target_filesystem"]
    lines = [
        "# distcp benchmark",
        "",
        f"`{results['command']}` — {results['date']}",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {host['cpu_model']}: {host['logical_cpus']} logical CPUs"
        f" ({host['physical_cores'] or '?'} cores), {host['usable_cpus']} usable |",
        f"| RAM | {host['ram_gib']} GiB |",
        f"| checkpoint dir | `{host['target_dir']}`: {fs['type']} on {fs['device']}"
        f" (mounted at {fs['mount_point']}), {host['target_free_gib']} GiB free |",
        f"| software | Linux {host['kernel']}, Python {host['python']}, torch {host['torch']},"
        f" distcp {host['distcp']} ({host['distcp_commit']}) |",
        "",
        "## Settings",
        "",
        "| | |",
        "|---|---|",
        f"| size | {settings['size_gib']:g} GiB (scenario b: {settings['small_count']} tensors) |",
        f"| rounds | {settings['rounds']} timed per library and phase, in ABBA order,"
        " after one untimed round that also verifies each load bit for bit |",
        f"| threads | {settings['threads']} I/O threads per rank for distcp, torch DCP's writer,"
        f" raw and memcpy; {settings['torch_threads']} torch thread per rank |",
        "| ranks | separate processes over gloo (CPU), started once; each op timed from a"
        " barrier before to a barrier after, the slowest rank counts |",
        f"| peak memory | {results['rss_method']}, per rank, extra over the resident size"
        " just before the op |",
        f"| page cache | {_cold_text(results['cold_cache'])} |",
        "",
        "GB/s is the phase's bytes ÷ the median time (10^9 bytes). **distcp ÷ peer** is"
        " distcp's speed over the peer's (peer time ÷ distcp time): above 1 distcp is"
        " faster; against `raw` and `memcpy` it is the fraction of the hardware limit"
        " reached. Peak RSS: the largest rank's extra resident memory, median of the rounds.",
        "",
        "## Summary (GB/s, higher is better)",
        "",
        "| scenario | phase | GB | "
        + " | ".join(libraries)
        + " | "
        + " | ".join(f"distcp ÷ {p}" for p in peers)
        + " |",
        "|---|---|---:|" + "---:|" * (len(libraries) + len(peers)),
    ]
    for scenario in results["scenarios"]:
        for phase in scenario["phases"]:
            if not phase["timed"]:
                continue
            row = [scenario["name"], phase["name"], f"{phase['bytes'] / 1e9:.3g}"]
            if phase.get("skipped"):
                cells = [phase["skipped"]] + [""] * (len(libraries) + len(peers) - 1)
                lines.append("| " + " | ".join(row + cells) + " |")
                continue
            for lib in libraries:
                record = phase["results"].get(lib)
                row.append(_gbps(record) if record else "")
            for peer in peers:
                ratio = phase["ratios"].get(peer)
                row.append(f"{ratio:.2f}" if ratio is not None else "")
            lines.append("| " + " | ".join(row) + " |")
    for scenario in results["scenarios"]:
        lines += _scenario_section(scenario, libraries)
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _scenario_section(scenario: dict[str, Any], libraries: list[str]) -> list[str]:
    lines = [
        "",
        f"## Scenario {scenario['name']}: {scenario['title']}",
        "",
        f"{scenario['tensors']} tensors, {scenario['bytes'] / MIB:.1f} MiB,"
        f" saved {scenario['save_layout']}.",
        "",
        "| phase | library | median s | min–max s | GB/s | distcp ÷ this | peak RSS /rank MiB"
        " | verified |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    notes = []
    for phase in scenario["phases"]:
        label = f"{phase['name']} ({phase['layout']})"
        if phase.get("skipped"):
            lines.append(f"| {label} | — | {phase['skipped']} | | | | | |")
            continue
        if not phase["timed"]:
            lines.append(f"| {label} | all | not timed (set-up) | | | | | |")
            continue
        for lib in libraries:
            record = phase["results"].get(lib)
            if record is None:
                continue
            if record.get("error"):
                lines.append(
                    f"| {label} | {lib} | failed: {_first_line(record['error'])} | | | | | |"
                )
                continue
            ratio = phase["ratios"].get(lib)
            lines.append(
                f"| {label} | {lib} | {record['median_s']:.3f} |"
                f" {record['min_s']:.3f}–{record['max_s']:.3f} | {_gbps(record)} |"
                f" {'' if lib == 'distcp' else _fmt_ratio(ratio)} |"
                f" {record['rss_extra_median_bytes'] / MIB:.0f} | {_verified(record)} |"
            )
        report = phase["results"].get("distcp", {}).get("report")
        if report and report.get("bytes_needed"):
            notes.append(
                f"{phase['name']}: distcp read {report['bytes_read'] / MIB:.1f} MiB for"
                f" {report['bytes_needed'] / MIB:.1f} MiB needed"
                f" (bytes_read ÷ bytes_needed = {report['read_amplification']:.2f}),"
                f" verified {report['bytes_verified'] / MIB:.1f} MiB"
            )
        for lib, where in (("distcp-async", "thread"), ("distcp-async-proc", "process")):
            result = phase["results"].get(lib, {})
            blocking = result.get("blocking_vs_sync_save")
            if blocking is not None:
                notes.append(
                    f"{phase['name']}: distcp.async_save ({where}) blocked the caller"
                    f" {result['blocking_median_s']:.3f} s (median), {blocking:.2f}× distcp's"
                    " synchronous save; the rest ran in the background"
                )
        if phase.get("cold_resident") is not None:
            notes.append(
                f"{phase['name']}: at most {phase['cold_resident']:.1%} of a checkpoint's pages"
                f" were still cached when a cold load began ({phase['cold_method']})"
            )
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return lines


def _cold_text(cold: dict[str, Any]) -> str:
    if cold["method"] == "none":
        return f"cold not measured ({cold['detail']})"
    return f"cold loads evict with {cold['method']} ({cold['detail']})"


def _gbps(record: dict[str, Any]) -> str:
    return "failed" if record.get("error") else f"{record['gbps']:.2f}"


def _fmt_ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}"


def _verified(record: dict[str, Any]) -> str:
    verified = record.get("verified")
    if verified is None:
        return str(record.get("verify_note", ""))
    return "bit-exact" if verified else "**MISMATCH** " + ", ".join(record["mismatched_keys"][:3])


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "error").replace("|", "/")[:120]


def print_summary(results: dict[str, Any]) -> None:
    sys.stdout.write(markdown(results))
