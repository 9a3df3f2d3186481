"""What the demo and ``train_resume.py`` share: a tiny transformer language
model, its two parallel layouts (FSDP2 and tensor parallel), synthetic token
data, and the launcher that runs a function on N gloo ranks.

The model is a few pre-norm blocks of causal self-attention and an MLP, built
from ``nn.Linear`` layers, with a 64-token vocabulary; a training step takes
a fraction of a second on one CPU core. The data are arithmetic progressions
modulo the vocabulary (``start, start + stride, ...``), so the loss visibly
falls within a few steps: the model learns to read the stride from context.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)
from torch.multiprocessing.spawn import spawn

__all__ = [
    "Config",
    "TinyLM",
    "apply_fsdp2",
    "apply_tensor_parallel",
    "launch",
    "loss_on",
    "synthetic_tokens",
]


@dataclass(frozen=True)
class Config:
    vocab: int = 64
    seq_len: int = 32
    dim: int = 128
    heads: int = 4
    blocks: int = 4
    mlp_ratio: int = 4


class Attention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.head_dim = config.dim // config.heads
        self.q = nn.Linear(config.dim, config.dim, bias=False)
        self.k = nn.Linear(config.dim, config.dim, bias=False)
        self.v = nn.Linear(config.dim, config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # -1 heads: under tensor parallelism q, k and v hold this rank's heads only.
        q, k, v = (
            proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))  # type: ignore[no-any-return]


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up = nn.Linear(config.dim, config.mlp_ratio * config.dim)
        self.down = nn.Linear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # type: ignore[no-any-return]


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))  # type: ignore[no-any-return]


class TinyLM(nn.Module):
    """Token and position embeddings, ``config.blocks`` blocks, a final norm
    and an output head; initialised from ``seed`` (the same on every rank)."""

    def __init__(self, config: Config, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.tokens = nn.Embedding(config.vocab, config.dim)
        self.positions = nn.Embedding(config.seq_len, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # type: ignore[no-any-return]


def apply_fsdp2(model: TinyLM, mesh: DeviceMesh) -> TinyLM:
    """FSDP2: each block, then the root (embeddings, final norm and head)."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def apply_tensor_parallel(model: TinyLM, mesh: DeviceMesh) -> TinyLM:
    """Megatron-style tensor parallelism: q, k, v and the MLP's first layer
    split by output features (``Shard(0)``, whole heads per rank), the attention
    output and the MLP's second layer by input features (``Shard(1)``); the
    embeddings, norms and head stay whole (replicated) on every rank."""
    plan: dict[str, ParallelStyle] = {
        "attn.q": ColwiseParallel(),
        "attn.k": ColwiseParallel(),
        "attn.v": ColwiseParallel(),
        "attn.out": RowwiseParallel(),
        "mlp.up": ColwiseParallel(),
        "mlp.down": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    return model


def synthetic_tokens(samples: int, config: Config, seed: int = 1234) -> torch.Tensor:
    """``samples`` sequences of ``seq_len + 1`` tokens, each an arithmetic
    progression modulo the vocabulary with a random start and stride."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, config.vocab, (samples, 1), generator=generator)
    stride = torch.randint(1, 8, (samples, 1), generator=generator)
    return (start + stride * torch.arange(config.seq_len + 1)) % config.vocab


def loss_on(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over every token of the batch."""
    logits = model(sequences[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), sequences[:, 1:].flatten())


def launch(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes,
    each joined to one gloo process group on a free local port. Raises if any
    rank fails (``torch.multiprocessing.spawn.ProcessException``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    spawn(_join, args=(world_size, port, fn, args), nprocs=world_size)  # type: ignore[no-untyped-call]


def _join(
    rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)  # the ranks share a few cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # leave together
    finally:
        dist.destroy_process_group()
    # torch 2.13's C++ teardown at interpreter exit sometimes aborts a CPU/gloo
    # FSDP2 process ("terminate called without an active exception"); the work
    # is done, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
