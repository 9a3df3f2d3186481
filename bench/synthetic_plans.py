"""Synthetic local save plans for R ranks × T tensors, without tensor memory.

What ``create_local_plan`` would return on every rank for a model whose tensors
are either DTensors ``Shard(0)`` over all ranks (FSDP) or full tensors on every
rank (DDP), built directly from shapes, in distcp's plan types and in torch
DCP's. Each rank's objects are its own, as after ``gather_object`` unpickles
every rank's plan separately (objects are shared within a rank's plan only).

Shards follow DTensor's uneven ``Shard(0)`` split (``torch.chunk``: every shard
``ceil(n / R)`` rows, trailing ones short or empty); an empty shard is one
empty box at offset ``shape[0]``, as distcp's ``tensor_layout`` and PyTorch
place it, so the ranks holding empty shards hold the *same* item and the
coordinator's dedup keeps it once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Layout = Literal["sharded", "replicated"]

VOCAB = 32000
HIDDEN = 4096
INTERMEDIATE = 11008
# Non-tensor values every rank holds (DCP's BYTE_IO items), encoded length in bytes.
VALUES = (("step", 8), ("lr_scheduler.last_epoch", 8))


@dataclass(frozen=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def model_tensors(count: int) -> list[TensorSpec]:
    """``count`` tensors of a Llama-7B-like model, in state-dict order: the
    embedding, then layers of (q, k, v, o [4096, 4096]; gate, up [11008, 4096];
    down [4096, 11008]; two norms [4096]), then the final norm and the output
    projection [32000, 4096], truncated to ``count`` (weights fp32 like
    FSDP's sharded master weights, norms bf16 for a dtype mix)."""
    specs = [TensorSpec("model.embed_tokens.weight", (VOCAB, HIDDEN), torch.float32)]
    layer = 0
    tail = [
        TensorSpec("model.norm.weight", (HIDDEN,), torch.bfloat16),
        TensorSpec("lm_head.weight", (VOCAB, HIDDEN), torch.float32),
    ]
    while len(specs) + len(tail) < count:
        prefix = f"model.layers.{layer}"
        specs += [
            TensorSpec(f"{prefix}.self_attn.{name}.weight", (HIDDEN, HIDDEN), torch.float32)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        specs += [
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), torch.float32),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), torch.float32),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), torch.float32),
            TensorSpec(f"{prefix}.input_layernorm.weight", (HIDDEN,), torch.bfloat16),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (HIDDEN,), torch.bfloat16),
        ]
        layer += 1
    specs = specs[: max(count - len(tail), 0)] + tail
    return specs[:count]


def shard0(
    shape: tuple[int, ...], ranks: int, rank: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offsets, sizes)`` of ``rank``'s ``Shard(0)`` piece of ``shape`` over
    ``ranks``; an empty piece sits at offset ``shape[0]``."""
    rows = shape[0]
    step = -(-rows // ranks)
    start = min(rank * step, rows)
    length = min(start + step, rows) - start
    rest = shape[1:]
    return (start, *(0 for _ in rest)), (length, *rest)


def _chunk(spec: TensorSpec, layout: Layout, ranks: int, rank: int) -> tuple[Any, Any]:
    if layout == "replicated":
        return (0,) * len(spec.shape), spec.shape
    return shard0(spec.shape, ranks, rank)


def _build(
    module: Any,
    planner: Any,
    ranks: int,
    specs: list[TensorSpec],
    layout: Layout,
    path: Callable[[str], Any],
) -> list[Any]:
    """One plan per rank, in ``module``'s/``planner``'s types (distcp and torch
    DCP name them alike, so one builder serves both)."""
    kind = planner.WriteItemType.SHARD if layout == "sharded" else planner.WriteItemType.TENSOR
    plans = []
    for rank in range(ranks):
        items = []
        for spec in specs:
            offsets, sizes = _chunk(spec, layout, ranks, rank)
            properties = module.TensorProperties(dtype=spec.dtype, requires_grad=True)
            data = planner.TensorWriteData(
                chunk=module.ChunkStorageMetadata(
                    offsets=torch.Size(offsets), sizes=torch.Size(sizes)
                ),
                properties=properties,
                size=torch.Size(spec.shape),
            )
            index = module.MetadataIndex(spec.key, offsets)
            items.append(planner.WriteItem(index=index, type=kind, tensor_data=data))
        for key, nbytes in VALUES:
            items.append(
                planner.WriteItem(
                    index=module.MetadataIndex(key),
                    type=planner.WriteItemType.BYTE_IO,
                    bytes_io_data=planner.BytesIOWriteData(nbytes),
                )
            )
        keys = [spec.key for spec in specs] + [key for key, _ in VALUES]
        plans.append(planner.SavePlan(items, planner_data={key: path(key) for key in keys}))
    return plans


def distcp_plans(ranks: int, specs: list[TensorSpec], layout: Layout) -> list[Any]:
    """The local plans distcp's ``DefaultSavePlanner.create_local_plan`` makes
    (``planner_data``: each key's path into the nested state dict, as a list)."""
    import distcp.metadata as module
    import distcp.planner as planner

    return _build(module, planner, ranks, specs, layout, lambda key: [key])


def dcp_plans(ranks: int, specs: list[TensorSpec], layout: Layout) -> list[Any]:
    """The same plans in torch DCP's types (``planner_data``: DCP's flattening
    mappings, key → path tuple)."""
    import torch.distributed.checkpoint.metadata as module
    import torch.distributed.checkpoint.planner as planner

    return _build(module, planner, ranks, specs, layout, lambda key: (key,))
