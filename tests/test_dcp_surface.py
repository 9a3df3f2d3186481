"""Every public name and module path of torch DCP 2.13 has a distcp twin with
the same parameters (or an error naming the alternative), and the twins that
are more than a re-export do what DCP's do."""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]

MODULES = [
    "api",
    "default_planner",
    "filesystem",
    "format_utils",
    "hf_storage",
    "logger",
    "logging_handlers",
    "metadata",
    "optimizer",
    "planner",
    "planner_helpers",
    "quantized_hf_storage",
    "resharding",
    "staging",
    "state_dict",
    "state_dict_loader",
    "state_dict_saver",
    "stateful",
    "storage",
    "utils",
]

# Names distcp leaves out on purpose: each raises an error naming the alternative.
REFUSED = {("filesystem", "FileSystem"), ("filesystem", "FileSystemBase")}

# Parameters distcp adds (keyword-only, defaulted), by (module, name).
EXTRA_KEYWORDS = {"verify_checksums", "thread_count", "checksum_block_size", "allow_pickle",
                  "allow_dtype_cast", "submodules"}  # fmt: skip


def _public(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else []


def test_every_torch_dcp_module_has_a_distcp_twin() -> None:
    missing = []
    for name in MODULES:
        torch_module = importlib.import_module(f"torch.distributed.checkpoint.{name}")
        ours = importlib.import_module(f"distcp.{name}")
        for public in _public(torch_module):
            if (name, public) in REFUSED:
                with pytest.raises(AttributeError, match=f"torch.distributed.checkpoint.{name}"):
                    getattr(ours, public)
            elif not hasattr(ours, public):
                missing.append(f"distcp.{name}.{public}")
    assert missing == []


def test_every_top_level_torch_dcp_name_is_in_distcp() -> None:
    names = [n for n in dir(torch_dcp) if not n.startswith("_")]
    assert [n for n in names if not hasattr(distcp, n)] == []


def _parameters(target: Any) -> list[inspect.Parameter] | None:
    try:
        function = target.__init__ if inspect.isclass(target) else target
        return list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return None


def test_twins_take_dcps_parameters_in_dcps_order() -> None:
    """Every parameter of DCP's function or class, in order and of the same
    kind; distcp may add only defaulted keyword-only ones."""
    wrong = []
    for name in MODULES:
        torch_module = importlib.import_module(f"torch.distributed.checkpoint.{name}")
        ours = importlib.import_module(f"distcp.{name}")
        for public in _public(torch_module):
            theirs_obj, ours_obj = getattr(torch_module, public), getattr(ours, public, None)
            if (name, public) in REFUSED or ours_obj is theirs_obj or not callable(ours_obj):
                continue
            theirs, mine = _parameters(theirs_obj), _parameters(ours_obj)
            if theirs is None or mine is None:
                continue
            shared = [(p.name, p.kind) for p in mine[: len(theirs)]]
            if shared != [(p.name, p.kind) for p in theirs]:
                wrong.append(f"{name}.{public}: {shared} vs {[(p.name, p.kind) for p in theirs]}")
            extra = [p for p in mine[len(theirs) :] if p.kind is not inspect.Parameter.VAR_KEYWORD]
            bad = [p.name for p in extra if p.default is inspect.Parameter.empty]
            if bad:
                wrong.append(f"{name}.{public}: extra required parameters {bad}")
    assert wrong == []


# ------------------------------------------------------------------ helpers


def test_default_plan_helpers_plan_like_the_planners() -> None:
    from distcp.default_planner import (
        create_default_global_load_plan,
        create_default_global_save_plan,
        create_default_local_load_plan,
        create_default_local_save_plan,
    )

    state = {"w": torch.ones(4, 2), "n": 3}
    local = create_default_local_save_plan(state, True)
    assert sorted(item.index.fqn for item in local.items) == ["n", "w"]
    plans, metadata = create_default_global_save_plan([local])
    assert set(metadata.state_dict_metadata) == {"n", "w"} and len(plans) == 1
    load = create_default_local_load_plan({"w": torch.zeros(4, 2)}, metadata)
    assert [item.dest_index.fqn for item in load.items] == ["w"]
    assert create_default_global_load_plan([load]) == [load]
    with pytest.raises(distcp.KeyMismatchError, match="Missing key"):
        create_default_local_load_plan({"absent": torch.zeros(1)}, metadata)
    assert (
        create_default_local_load_plan({"absent": torch.zeros(1)}, metadata, strict=False).items
        == []
    )


def test_read_items_for_a_chunk_list_cover_the_overlaps() -> None:
    from distcp.metadata import ChunkStorageMetadata, TensorProperties, TensorStorageMetadata
    from distcp.planner_helpers import create_read_items_for_chunk_list

    saved = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size([4, 4]),
        [ChunkStorageMetadata(torch.Size([r, 0]), torch.Size([2, 4])) for r in (0, 2)],
    )
    wanted = [ChunkStorageMetadata(torch.Size([1, 1]), torch.Size([2, 2]))]
    items = create_read_items_for_chunk_list("w", saved, wanted)
    assert [(tuple(i.storage_index.offset or ()), tuple(i.storage_offsets), tuple(i.dest_offsets),
             tuple(i.lengths)) for i in items] == [
        ((0, 0), (1, 1), (0, 0), (1, 2)),
        ((2, 0), (0, 1), (1, 0), (1, 2)),
    ]  # fmt: skip


def test_find_state_dict_object() -> None:
    from distcp.metadata import MetadataIndex
    from distcp.utils import find_state_dict_object

    tensor = torch.arange(4)
    assert find_state_dict_object({"w": tensor, "n": 1}, MetadataIndex("w", [0])) is tensor
    assert find_state_dict_object({"n": 1}, MetadataIndex("n")) == 1
    with pytest.raises(ValueError, match="'x'"):
        find_state_dict_object({"n": 1}, MetadataIndex("x"))
    with pytest.raises(ValueError, match="offsets"):
        find_state_dict_object({"w": tensor}, MetadataIndex("w", [2]))


class Hidden(torch.nn.Module):
    """A module whose parameters live under a hidden child it declares."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)

    def _fqn_modifiers(self) -> dict[str, str]:
        return {"linear": "inner"}

    def custom_modifiers(self) -> dict[str, str]:
        return {"linear": "inner"}


def test_dsd_fqn_modifiers_hide_declared_children() -> None:
    from distcp.state_dict import StateDictOptions, get_model_state_dict

    model = torch.nn.Sequential(Hidden())
    assert sorted(get_model_state_dict(model)) == ["0.bias", "0.weight"]
    named = get_model_state_dict(
        model, options=StateDictOptions(dsd_fqn_modifiers="custom_modifiers")
    )
    assert sorted(named) == ["0.bias", "0.weight"]
    plain = get_model_state_dict(model, options=StateDictOptions(dsd_fqn_modifiers="absent"))
    assert sorted(plain) == ["0.inner.bias", "0.inner.weight"]


def sharded_optimizer(rank: int, world_size: int, path: str) -> bool:
    mesh = init_device_mesh("cpu", (world_size,))
    weight = distribute_tensor(random_tensor((4, 3), torch.float32, 1), mesh, [Shard(0)])
    moment = distribute_tensor(random_tensor((4, 3), torch.float32, 2), mesh, [Shard(0)])
    distcp.save(
        {"model": {"w": weight}, "optim": {"state": {"w": {"exp_avg": moment, "step": 7}}}},
        checkpoint_id=path,
    )
    from distcp.optimizer import load_sharded_optimizer_state_dict

    loaded = load_sharded_optimizer_state_dict(
        {"w": weight}, "optim", distcp.FileSystemReader(path)
    )
    state = loaded["optim"]["state"]["w"]
    got = state["exp_avg"]
    return (
        isinstance(got, DTensor)
        and got.placements == moment.placements
        and raw(got.to_local()) == raw(moment.to_local())
        and state["step"] == 7
    )


def test_load_sharded_optimizer_state_dict_shards_like_the_model(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    assert rank_pool(2).run(sharded_optimizer, str(tmp_path)) == [True, True]


# ------------------------------------------------------------------ async staging


def test_async_save_with_a_background_default_stager_returns_dcps_response(tmp_path: Path) -> None:
    from distcp.staging import DefaultStager, StagingOptions

    live = {"w": random_tensor((64, 64), torch.float32, 3)}
    saved = live["w"].clone()
    response = distcp.async_save(
        live,
        checkpoint_id=tmp_path,
        async_stager=DefaultStager(StagingOptions(use_pinned_memory=False)),
        no_dist=True,
    )
    assert isinstance(response, torch_dcp.state_dict_saver.AsyncSaveResponse)
    response.staging_completion.result(timeout=60)
    live["w"].fill_(-1)  # after staging: must not reach the checkpoint
    response.upload_completion.result(timeout=60)
    fresh = {"w": torch.zeros(64, 64)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert raw(fresh["w"]) == raw(saved)


def test_async_save_with_a_blocking_default_stager_returns_a_future(tmp_path: Path) -> None:
    from distcp.staging import DefaultStager, StagingOptions

    live = {"w": torch.arange(8.0)}
    future = distcp.async_save(
        live,
        checkpoint_id=tmp_path,
        async_stager=DefaultStager(StagingOptions(False, False, False, False)),
        async_checkpointer_type=torch_dcp.state_dict_saver.AsyncCheckpointerType.THREAD,
        no_dist=True,
    )
    live["w"].zero_()  # staged before the call returned
    assert isinstance(future, Future)
    future.result(timeout=60)
    fresh = {"w": torch.zeros(8)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert fresh["w"].tolist() == list(range(8))


@pytest.mark.parametrize("stager", ["torch-default", "torch-blocking", "distcp-blocking"])
def test_async_save_with_another_stager(tmp_path: Path, stager: str) -> None:
    from torch.distributed.checkpoint import staging as torch_staging

    chosen: Any = {
        "torch-default": lambda: torch_staging.DefaultStager(
            torch_staging.StagingOptions(False, False, True, False)
        ),
        "torch-blocking": torch_staging.BlockingAsyncStager,
        "distcp-blocking": distcp.staging.BlockingAsyncStager,
    }[stager]()
    live = {"w": torch.arange(6.0), "step": 3}
    result = distcp.async_save(live, checkpoint_id=tmp_path, async_stager=chosen, no_dist=True)
    if isinstance(result, torch_dcp.state_dict_saver.AsyncSaveResponse):
        result.staging_completion.result(timeout=60)
        upload = result.upload_completion
    else:
        upload = result
    live["w"].zero_()
    upload.result(timeout=60)
    fresh: dict[str, Any] = {"w": torch.zeros(6), "step": None}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert fresh["w"].tolist() == list(range(6)) and fresh["step"] == 3
    chosen.close()


def test_torch_async_save_drives_distcps_stager_and_storage(tmp_path: Path) -> None:
    live = {"w": torch.arange(5.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = torch_dcp.async_save(
            live,
            storage_writer=distcp.FileSystemWriter(tmp_path),
            async_stager=distcp.staging.BlockingAsyncStager(),
        )
    (result.upload_completion if hasattr(result, "upload_completion") else result).result(60)
    fresh = {"w": torch.zeros(5)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert fresh["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def rank_local(rank: int, world_size: int, path: str) -> bool:
    mine = {"w": torch.full((3,), float(rank)), "rank": rank}
    distcp.save(mine, checkpoint_id=path, use_collectives=False)
    fresh: dict[str, Any] = {"w": torch.zeros(3), "rank": None}
    distcp.load(fresh, checkpoint_id=path)
    return fresh["rank"] == rank and fresh["w"].tolist() == [float(rank)] * 3


def test_rank_local_saves_load_per_rank(tmp_path: Path, rank_pool: PoolFactory) -> None:
    assert rank_pool(2).run(rank_local, str(tmp_path)) == [True, True]
