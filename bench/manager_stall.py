"""Training stall: how long checkpointing holds up training, with
``distcp.CheckpointManager``'s modes and with torch DCP's ``async_save``
driven the way torchtitan's checkpoint manager drives it.

    python -m bench.manager_stall [--steps 24] [--interval 4] [--width 1024] [--rounds 2]

Two gloo ranks train the same small model (a stack of ``--layers`` linear
layers of ``--width``², each wrapped with FSDP2's ``fully_shard``, AdamW) for
``--steps`` steps, checkpointing every ``--interval`` steps into a fresh
root. The stall of a checkpoint step is that step's time minus the median
time of the steps that do not checkpoint, both measured on each rank from a
barrier to a barrier (the slowest rank counts); the run's extra time is its
total minus ``steps ×`` that median. Variants, in ABBA order per round:

- ``distcp sync``: ``CheckpointManager(async_mode=None)``;
- ``distcp thread`` / ``distcp process``: ``async_mode="thread"`` / ``"process"``;
- ``torch DCP async (torchtitan)``: ``dcp.async_save(state, checkpoint_id=...,
  process_group=<a gloo group of its own>)``, and before the next save the
  previous future's ``result()`` — what torchtitan's ``CheckpointManager`` does
  in its ``async`` mode.

Writes ``bench/results/manager_stall.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report
from bench.measure import abba
from distcp.testing import RankPool

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ["distcp sync", "distcp thread", "distcp process", "torch DCP async (torchtitan)"]

_held: dict[str, Any] = {}


def train_run(
    rank: int, world_size: int, variant: str, root: str, args: dict[str, int]
) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distcp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args["width"], args["width"]) for _ in range(args["layers"])])
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randn(16, args["width"])
    if "dcp_group" not in _held:
        _held["dcp_group"] = dist.new_group(backend="gloo")
    state = {"model": model, "optimizer": optimizer}
    manager = None
    if variant.startswith("distcp"):
        mode = variant.split()[1]
        manager = distcp.CheckpointManager(root, async_mode=None if mode == "sync" else mode)
    future = None
    times, saving, blocked = [], [], []
    dist.barrier()
    run_began = time.perf_counter()
    for step in range(1, args["steps"] + 1):
        dist.barrier()
        began = time.perf_counter()
        loss = model(batch).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        checkpointing = step % args["interval"] == 0
        if checkpointing:
            call_began = time.perf_counter()
            if manager is not None:
                manager.save(step, state)
            else:  # torchtitan's async mode: wait for the previous, then async_save
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import (
                    get_model_state_dict,
                    get_optimizer_state_dict,
                )

                if future is not None:
                    future.result()
                to_save = {
                    "model": get_model_state_dict(model),
                    "optimizer": get_optimizer_state_dict(model, optimizer),
                }
                future = dcp.async_save(
                    to_save,
                    checkpoint_id=f"{root}/step-{step}",
                    process_group=_held["dcp_group"],
                )
            blocked.append(time.perf_counter() - call_began)
        dist.barrier()
        times.append(time.perf_counter() - began)
        saving.append(checkpointing)
    if manager is not None:
        manager.close()
    if future is not None:
        future.result()
    dist.barrier()
    total = time.perf_counter() - run_began
    return {"times": times, "saving": saving, "blocked": blocked, "total": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.manager_stall", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = {k: getattr(args, k) for k in ("steps", "interval", "width", "layers")}
    workdir = Path(tempfile.mkdtemp(prefix="distcp-stall-"))
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    try:
        with RankPool(2, run_timeout_s=1800) as pool:
            for round_index in range(args.rounds + 1):  # round 0 warms up
                for variant in abba(VARIANTS, round_index):
                    root = workdir / f"{variant.replace(' ', '_')}-{round_index}"
                    outcome = pool.run(train_run, variant, str(root), settings)
                    shutil.rmtree(root, ignore_errors=True)
                    if round_index:
                        runs[variant].append(_stall(outcome))
                    print(f"round {round_index} {variant:30} done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    state_bytes = args.layers * (args.width * args.width + args.width) * 4 * 3  # + AdamW moments
    rows = []
    for variant in VARIANTS:
        stalls = [r["stall_per_save"] for r in runs[variant]]
        calls = [r["blocked_per_save"] for r in runs[variant]]
        extras = [r["extra"] for r in runs[variant]]
        rows.append(
            {
                "variant": variant,
                "blocked_per_save_s": statistics.median(calls),
                "stall_per_save_s": statistics.median(stalls),
                "extra_run_s": statistics.median(extras),
                "step_s": statistics.median(r["step"] for r in runs[variant]),
            }
        )
    results = {
        "command": shlex.join(["python", "-m", "bench.manager_stall", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {**settings, "rounds": args.rounds, "state_bytes": state_bytes, "ranks": 2},
        "machine": report.machine(Path(tempfile.gettempdir())),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "manager_stall.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "manager_stall.md").write_text(_markdown(results))
    print(_markdown(results))
    return 0


def _stall(outcome: list[dict[str, Any]]) -> dict[str, float]:
    """Per-step times, slowest rank; stall per checkpoint step and extra run time."""
    times = [max(r["times"][i] for r in outcome) for i in range(len(outcome[0]["times"]))]
    saving = outcome[0]["saving"]
    plain = statistics.median(t for t, s in zip(times, saving, strict=True) if not s)
    stalls = [t - plain for t, s in zip(times, saving, strict=True) if s]
    total = max(r["total"] for r in outcome)
    calls = [max(r["blocked"][i] for r in outcome) for i in range(len(outcome[0]["blocked"]))]
    return {
        "blocked_per_save": statistics.median(calls),
        "stall_per_save": statistics.median(stalls),
        "extra": total - plain * len(times),
        "step": plain,
    }


def _markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    reference = next(r for r in results["rows"] if r["variant"].startswith("torch"))
    lines = [
        "# Training stall while checkpointing: CheckpointManager vs torch DCP async_save",
        "",
        f"`{results['command']}` on {results['date']}: {settings['ranks']} gloo ranks, FSDP2, "
        f"{settings['layers']} linear layers of {settings['width']}² with AdamW "
        f"({settings['state_bytes'] / 2**20:.0f} MiB of state), {settings['steps']} steps, a "
        f"checkpoint every {settings['interval']}, median of {settings['rounds']} ABBA rounds "
        "after an untimed one.",
        "",
        "| variant | blocked in the checkpoint call s | ÷ torch DCP async "
        "| checkpoint step's extra time s | extra run time s | ÷ torch DCP async | step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['variant']} | {row['blocked_per_save_s']:.3f} | "
            f"{row['blocked_per_save_s'] / reference['blocked_per_save_s']:.2f}× | "
            f"{row['stall_per_save_s']:.3f} | {row['extra_run_s']:.2f} | "
            f"{row['extra_run_s'] / reference['extra_run_s']:.2f}× | {row['step_s']:.3f} |"
        )
    lines += [
        "",
        "- Blocked: the time inside the checkpoint call (manager.save; for torch DCP the wait"
        " for the previous save, get_state_dict and async_save), the slowest rank. A checkpoint"
        " step's extra time: its time minus the median of the other steps (noisy: it can come"
        " out below zero). Extra run time: the run's total minus steps × that median, which"
        " includes waiting for the last save.",
        "- On 2 cores the background write competes with training for the CPU, so the steps"
        " after a checkpoint slow down too; the extra run time counts that, the stall does not.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
