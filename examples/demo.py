"""distcp demo: train a small transformer with FSDP2 on 4 ranks, checkpoint it,
resume on 2 ranks with tensor parallelism instead, and check that nothing was lost.

    python examples/demo.py [--dir DIR]      (or: make demo)

1. 4 ranks (real processes, gloo on CPU) train ``TinyLM`` (``tiny_lm.py``: 4
   blocks of attention + MLP) sharded with FSDP2 (``fully_shard`` on each block
   and the root) with AdamW, on synthetic token data drawn by a
   ``ResumableSampler``. After 8 steps they save model, optimizer, step, RNG
   streams and the sampler's position as one ``distcp.training.TrainingState``
   through a ``distcp.CheckpointManager`` (``DIR/checkpoints/step-8``), then
   train 4 more steps: the uninterrupted run.
2. 2 fresh ranks build the model with a different seed, split it by tensor
   parallelism (q, k, v and the MLP's first layer by rows, the attention output
   and the MLP's second layer by columns, the rest replicated), and the
   manager loads its newest committed step into it: each rank reads just the pieces of
   the 4 row-shards it now holds. The full model and optimizer state (gathered
   on rank 0) must equal, bit for bit, the state saved by the 4-rank run, and
   the 4 steps that follow must give the uninterrupted run's losses. Those
   agree to a relative 1e-5, not bitwise: tensor parallelism sums the matrix
   products in another order than one rank computing them whole.

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing.spawn import ProcessException
from tqdm import tqdm

import distcp
from distcp.state_dict import StateDictOptions, get_state_dict
from distcp.training import ResumableSampler, TrainingState

# isort: split
from tiny_lm import (  # examples/tiny_lm.py: the model, its layouts, data, launcher
    Config,
    TinyLM,
    apply_fsdp2,
    apply_tensor_parallel,
    launch,
    loss_on,
    synthetic_tokens,
)

SAVE_RANKS = 4
RESUME_RANKS = 2
STEPS_BEFORE_SAVE = 8
STEPS_AFTER_SAVE = 4
GLOBAL_BATCH = 32  # sequences a step, over all data-parallel ranks
DATASET = 4096  # sequences
LEARNING_RATE = 3e-3
LOSS_RTOL = 1e-5  # resumed vs uninterrupted losses (different summation order, see above)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
CONFIG = Config()


# --- what the ranks run -----------------------------------------------------------------------


def train(
    state: TrainingState,
    sampler: ResumableSampler,
    data: torch.Tensor,
    steps: int,
    label: str,
) -> list[float]:
    """``steps`` AdamW steps on the next ``GLOBAL_BATCH`` sequences of the
    sampler's order; returns each step's loss over the whole global batch."""
    model, optimizer = state.model, state.optimizers
    assert isinstance(optimizer, torch.optim.Optimizer)
    per_rank = GLOBAL_BATCH // sampler.num_replicas
    losses = []
    quiet = dist.get_rank() != 0 or not sys.stderr.isatty()
    for _ in tqdm(range(steps), desc=f"      {label}", leave=False, disable=quiet):
        indices = list(islice(iter(sampler), per_rank))
        loss = loss_on(model, data[indices])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        sampler.advance(GLOBAL_BATCH)
        state.step += 1
        total = loss.detach().clone()
        dist.all_reduce(total)  # mean of the ranks' means (equal under tensor parallelism)
        losses.append(total.item() / dist.get_world_size())
    return losses


def save_run(rank: int, world_size: int, workdir: str) -> None:
    """4 ranks, FSDP2: train, save, record the saved state, train on."""
    model = apply_fsdp2(TinyLM(CONFIG, seed=0), init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)
    sampler = ResumableSampler(DATASET, num_replicas=world_size, rank=rank, seed=0)
    state = TrainingState(model, optimizer, extras={"sampler": sampler})
    data = synthetic_tokens(DATASET, CONFIG)
    say(rank, f"[1/2] {world_size} ranks, FSDP2 (fully_shard on each block and the root)")
    before = train(state, sampler, data, STEPS_BEFORE_SAVE, "train")
    say(rank, f"      train   {steps(1, state.step)} loss {span(before)}")

    manager = distcp.CheckpointManager(Path(workdir) / "checkpoints")
    checkpoint = Path(workdir) / "checkpoints" / f"step-{state.step}"
    say(rank, f"      save    step {state.step} -> {checkpoint}")
    dist.barrier()
    start = time.perf_counter()
    manager.save(state.step, {"app": state})
    manager.close()
    save_s = slowest(time.perf_counter() - start)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)  # on rank 0 only
    if rank == 0:  # the reference the resumed run compares with, bit for bit
        reference = {"model": model_sd, "optim": optim_sd, "sampler": sampler.state_dict()}
        torch.save(reference, Path(workdir) / "reference.pt")
    after = train(state, sampler, data, STEPS_AFTER_SAVE, "train")
    say(rank, f"      train   {steps(STEPS_BEFORE_SAVE + 1, state.step)} loss {span(after)}")
    if rank == 0:
        parameters = sum(value.numel() for value in model_sd.values())
        report = {"checkpoint": str(checkpoint), "save_s": save_s, "losses": after}
        report |= {"parameters": parameters}
        (Path(workdir) / "save_run.json").write_text(json.dumps(report))


def resume_run(rank: int, world_size: int, workdir: str) -> None:
    """2 ranks, tensor parallel: load, compare with the saved state, train on."""
    warnings.filterwarnings("ignore", message="RNGState: the checkpoint holds RNG states")
    # ^ 4 ranks' RNG streams resume on 2; the model has no dropout, so they do not matter.
    saved = json.loads((Path(workdir) / "save_run.json").read_text())
    model = apply_tensor_parallel(TinyLM(CONFIG, seed=1), init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)
    # One data-parallel replica: both tensor-parallel ranks take the whole global batch.
    sampler = ResumableSampler(DATASET, num_replicas=1, rank=0, seed=1)
    state = TrainingState(model, optimizer, extras={"sampler": sampler})
    say(rank, f"[2/2] {world_size} ranks, tensor parallel (q, k, v, mlp.up split by rows,")
    say(rank, "      attn.out, mlp.down by columns; embeddings, norms, head replicated)")

    loads: list[dict[str, Any]] = []
    dist.barrier()
    start = time.perf_counter()
    with distcp.CheckpointManager(Path(workdir) / "checkpoints", on_event=loads.append) as manager:
        manager.load({"app": state})  # the newest committed step
    load_s = slowest(time.perf_counter() - start)
    say(rank, f"      load    step {state.step} <- {saved['checkpoint']}")
    (loaded,) = [event for event in loads if event["event"] == "load"]
    counts = torch.tensor([loaded["bytes_read"], loaded["bytes_needed"]])
    dist.all_reduce(counts)

    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    mismatches: list[str] = []
    if rank == 0:
        reference = torch.load(Path(workdir) / "reference.pt", weights_only=True)
        mismatches = differences(reference["model"], model_sd, "model")
        mismatches += differences(reference["optim"], optim_sd, "optim")
        mismatches += differences(reference["sampler"], sampler.state_dict(), "sampler")
        if state.step != STEPS_BEFORE_SAVE:
            mismatches.append(f"step {state.step} != {STEPS_BEFORE_SAVE}")
        verdict = "bit-exact" if not mismatches else f"{len(mismatches)} DIFFERENCES"
        say(rank, f"      check   model, optimizer, step, sampler vs the saved ones: {verdict}")

    losses = train(state, sampler, synthetic_tokens(DATASET, CONFIG), STEPS_AFTER_SAVE, "train")
    say(rank, f"      train   {steps(STEPS_BEFORE_SAVE + 1, state.step)} loss {span(losses)}")
    if rank == 0:
        report = {"load_s": load_s, "losses": losses, "mismatches": mismatches}
        report |= {"bytes_read": int(counts[0]), "bytes_needed": int(counts[1])}
        (Path(workdir) / "resume_run.json").write_text(json.dumps(report))


def differences(expected: Any, actual: Any, key: str) -> list[str]:
    """The keys under which ``actual`` is not bit for bit ``expected``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{key}.{k}: missing or unexpected" for k in expected.keys() ^ actual.keys()]
        for name in expected.keys() & actual.keys():
            found += differences(expected[name], actual[name], f"{key}.{name}")
        return found
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        if len(expected) != len(actual):
            return [f"{key}: length {len(actual)} != {len(expected)}"]
        return [
            d
            for i, pair in enumerate(zip(expected, actual, strict=True))
            for d in differences(*pair, f"{key}.{i}")
        ]
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        same = expected.dtype == actual.dtype and expected.shape == actual.shape
        same = same and torch.equal(raw(expected), raw(actual))
        return [] if same else [key]
    return [] if expected == actual and type(expected) is type(actual) else [key]


def raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def say(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def steps(first: int, last: int) -> str:
    return f"steps {first}-{last}".ljust(12)


def span(losses: list[float]) -> str:
    return " ".join(f"{loss:.4f}" for loss in losses)


# --- the driver -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="keep the checkpoint here")
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="distcp-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"distcp demo: TinyLM ({CONFIG.blocks} blocks of attention + MLP, vocabulary "
        f"{CONFIG.vocab}), AdamW, {GLOBAL_BATCH} sequences a step",
        flush=True,
    )
    try:
        launch(save_run, SAVE_RANKS, str(workdir))
        launch(resume_run, RESUME_RANKS, str(workdir))
    except ProcessException as error:
        print(f"\nFAILED: a rank failed (files left in {workdir})\n{error}", file=sys.stderr)
        return 1
    saved = json.loads((workdir / "save_run.json").read_text())
    resumed = json.loads((workdir / "resume_run.json").read_text())

    files = [p for p in Path(saved["checkpoint"]).iterdir() if p.is_file()]
    mib = sum(p.stat().st_size for p in files) / 2**20
    worst = max(
        abs(a - b) / abs(a) for a, b in zip(saved["losses"], resumed["losses"], strict=True)
    )
    losses_match = worst <= LOSS_RTOL and all(map(math.isfinite, resumed["losses"]))
    print()
    print(f"model           {saved['parameters'] / 1e6:.2f} M parameters (+ AdamW state)")
    print(f"checkpoint      {mib:.1f} MiB in {len(files)} files")
    save_s, load_s = saved["save_s"], resumed["load_s"]
    print(f"save            {save_s:.2f} s  ({mib / save_s:.0f} MiB/s) on {SAVE_RANKS} ranks")
    print(f"load            {load_s:.2f} s  ({mib / load_s:.0f} MiB/s) on {RESUME_RANKS} ranks")
    print(
        f"bytes read      {resumed['bytes_read'] / resumed['bytes_needed']:.2f} x the bytes needed"
    )
    if resumed["mismatches"]:
        print(f"state           FAILED: {', '.join(resumed['mismatches'][:10])}")
    else:
        print("state           model + optimizer + step + sampler bit-exact after resharding")
    verdict = "match" if losses_match else "DIFFER from"
    print(
        f"losses          steps {STEPS_BEFORE_SAVE + 1}-{STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE} "
        f"{verdict} the uninterrupted run (max relative difference {worst:.1e}, "
        f"tolerance {LOSS_RTOL:.0e})"
    )
    if not losses_match or resumed["mismatches"]:
        print(f"FAILED (files left in {workdir})", file=sys.stderr)
        return 1
    if args.dir is None:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
