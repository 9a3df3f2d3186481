"""Train with FSDP2, checkpoint every few steps, and resume after a restart,
on the same or a different number of ranks.

    python examples/train_resume.py --ckpt-dir DIR [--steps 20] [--save-every 5]
                                    [--world-size 2] [--global-batch 16]
                                    [--async-save {off,thread,process}] [--keep K]

Trains ``TinyLM`` (``tiny_lm.py``) on ``--world-size`` gloo ranks (CPU), each
block and the root wrapped with ``fully_shard``, with AdamW on synthetic
tokens, up to step ``--steps``. Every ``--save-every`` steps, and at the last
step, the whole training state (model, optimizer, step, RNG streams and the
data sampler's position: one ``distcp.training.TrainingState``) is saved to
``DIR/step-<N>``. With ``--async-save thread`` or ``process`` the save runs in
the background while training goes on; each save is waited for before the
next one starts, and the last before the run ends.

The loop around the saves is ``distcp.CheckpointManager``'s: the interval,
one async save in flight, retention (``--keep 3``: the newest 3 steps, older
ones removed in the background after each commit, never the newest committed
one), and a JSON-lines log of every save and load in ``DIR/checkpoint-log.jsonl``.

On start it resumes from the latest committed checkpoint in ``DIR`` (the
manager never chooses a ``step-<N>`` whose save did not commit).
Resuming on another world size works: each rank loads its new shards, and
the sampler continues from the same global sample. Keep ``--global-batch``
(sequences per step over all ranks) the same to continue the same run.

Example: train 4 steps on 2 ranks, then continue to step 6 on 1 rank::

    python examples/train_resume.py --ckpt-dir /tmp/run --steps 4 --save-every 2 --world-size 2
    python examples/train_resume.py --ckpt-dir /tmp/run --steps 6 --save-every 2 --world-size 1

The second run prints ``resumed from /tmp/run/step-4 at step 4``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.multiprocessing.spawn import ProcessException

import distcp
from distcp.training import ResumableSampler, TrainingState

# isort: split
from tiny_lm import (  # examples/tiny_lm.py: the model, its layouts, data, launcher
    Config,
    TinyLM,
    apply_fsdp2,
    launch,
    loss_on,
    synthetic_tokens,
)

DATASET = 4096  # sequences
CONFIG = Config()


def run(rank: int, world_size: int, args: argparse.Namespace) -> None:
    if rank != 0:  # the warning that RNG streams continue on another world size: once
        warnings.filterwarnings("ignore", message="RNGState: ")
    model = apply_fsdp2(TinyLM(CONFIG, seed=0), init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sampler = ResumableSampler(DATASET, num_replicas=world_size, rank=rank, seed=0)
    state = TrainingState(model, optimizer, extras={"sampler": sampler})
    data = synthetic_tokens(DATASET, CONFIG)

    mode = None if args.async_save == "off" else args.async_save

    def on_event(event: dict[str, Any]) -> None:  # a save is reported once it committed
        if event["event"] == "save":
            step = event["step"]
            log(f"saved {args.ckpt_dir / f'step-{step}'}")

    with distcp.CheckpointManager(
        args.ckpt_dir,
        interval=args.save_every,
        keep_latest_k=args.keep,
        async_mode=mode,
        on_event=on_event,
    ) as manager:
        resumed = manager.load({"app": state})
        if resumed is None:
            log(f"no checkpoint in {args.ckpt_dir}: starting at step 0 on {ranks(world_size)}")
        else:
            log(
                f"resumed from {args.ckpt_dir / f'step-{resumed}'} at step {state.step} on "
                f"{ranks(world_size)} (sample {sampler.position} of epoch {sampler.epoch})"
            )
        train(state, model, optimizer, sampler, data, manager, args, world_size)
    log(f"done: step {state.step}")


def train(
    state: TrainingState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: ResumableSampler,
    data: torch.Tensor,
    manager: distcp.CheckpointManager,
    args: argparse.Namespace,
    world_size: int,
) -> None:
    per_rank = args.global_batch // world_size
    while state.step < args.steps:
        if len(sampler) < per_rank:  # this epoch's data is used up
            sampler.set_epoch(sampler.epoch + 1)
        indices = list(islice(iter(sampler), per_rank))
        loss = loss_on(model, data[indices])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        sampler.advance(args.global_batch)
        state.step += 1
        total = loss.detach().clone()
        dist.all_reduce(total)
        log(f"step {state.step:4d}  loss {total.item() / world_size:.4f}")
        # Every --save-every steps, and the last step whatever the interval.
        manager.save(state.step, {"app": state}, force=state.step == args.steps)


def ranks(count: int) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def log(line: str) -> None:
    if dist.get_rank() == 0:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt-dir", type=Path, required=True, help="where step-<N> go")
    parser.add_argument("--steps", type=int, default=20, help="train up to this step")
    parser.add_argument("--save-every", type=int, default=5, help="save every N steps")
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences a step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--keep", type=int, default=3, help="keep the newest K steps")
    parser.add_argument(
        "--async-save",
        choices=["off", "thread", "process"],
        default="off",
        help="save in the background: from a thread or a writer process",
    )
    args = parser.parse_args()
    if args.global_batch % args.world_size:
        parser.error("--global-batch must be a multiple of --world-size")
    if args.save_every < 1 or args.world_size < 1:
        parser.error("--save-every and --world-size must be positive")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    try:
        launch(run, args.world_size, args)
    except ProcessException as error:
        print(f"FAILED: a rank failed\n{error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
