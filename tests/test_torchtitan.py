"""torchtitan's real ``CheckpointManager`` (torchtitan 0.3) with its ``dcp``
bound to distcp, on 2 gloo ranks: the checkpoints a torchtitan job writes and
resumes from, in each of its async modes, its final bf16 model-only export,
its Hugging Face export and its initial loads (native and HF).

The job itself (torchtitan's optimizer, LR scheduler and dataloader
containers around an FSDP2 MLP) is in ``torchtitan_job.py``. Also: a seed
checkpoint (1 rank, unsharded) resumed under FSDP2, a resume on another world
size, a legacy BytesIO train state, and a remote (``file://``) folder.

``async_with_pinned_mem`` runs as torchtitan builds it: a
``DefaultStager(StagingOptions(use_pinned_memory=True, ...))`` passed with
``AsyncCheckpointerType.PROCESS``; distcp's stager pins only when CUDA is
present, so nothing is switched off for CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distcp.testing import RankPool

try:
    import safetensors.torch as safetensors_torch

    import torchtitan_job as job  # needs torchtitan 0.3 and its import-time packages
except ImportError as missing:  # a visible skip on a bare machine; never in CI
    if os.environ.get("CI"):
        raise
    pytest.skip(f"torchtitan's dev packages are not installed: {missing}", allow_module_level=True)

PoolFactory = Callable[[int], RankPool]
WORLD = 2


def _run(rank_pool: PoolFactory, function: Callable[..., Any], *args: Any) -> list[Any]:
    return rank_pool(WORLD).run(function, *args, timeout_s=120)


@pytest.mark.parametrize("async_mode", ["disabled", "async", "async_with_pinned_mem"])
def test_save_at_2_and_4_then_resume(
    rank_pool: PoolFactory, tmp_path: Path, async_mode: str
) -> None:
    folder = str(tmp_path / "checkpoint")
    missing = _run(rank_pool, job.save_and_resume, folder, async_mode)
    assert missing == [[], []], f"distcp lacks twins of {missing[0]}"
    assert sorted(os.listdir(folder)) == ["step-2", "step-4"]


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_remote_folder_through_fsspec(
    rank_pool: PoolFactory, tmp_path: Path, async_mode: str
) -> None:
    """torchtitan treats a folder with "://" as remote (fsspec) and passes the
    URL to dcp as the checkpoint_id; file:// is a remote store every rank sees."""
    folder = "file://" + str(tmp_path / "checkpoint")
    _run(rank_pool, job.save_and_resume, folder, async_mode)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2", "step-4"]


def test_legacy_bytesio_train_state(rank_pool: PoolFactory, tmp_path: Path) -> None:
    _run(rank_pool, job.legacy_train_state, str(tmp_path / "checkpoint"))


def test_last_step_model_only_bf16_export_and_initial_load(
    rank_pool: PoolFactory, tmp_path: Path
) -> None:
    folder = str(tmp_path / "checkpoint")
    full = _run(rank_pool, job.export_last_step, folder, False, False)[0]
    assert all(value.dtype == torch.bfloat16 for value in full.values())
    loaded = _run(
        rank_pool,
        job.initial_load,
        str(tmp_path / "fresh"),
        os.path.join(folder, "step-3"),
        False,
    )[0]
    _assert_weights(loaded, {key: value.float() for key, value in full.items()})


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "index-mapping"])
def test_hf_export_and_hf_initial_load(
    rank_pool: PoolFactory, tmp_path: Path, sharded: bool
) -> None:
    folder = str(tmp_path / "checkpoint")
    full = _run(rank_pool, job.export_last_step, folder, True, sharded)[0]
    step_3 = Path(folder) / "step-3"
    files = sorted(step_3.glob("*.safetensors"))
    assert len(files) == (2 if sharded else 1), sorted(p.name for p in step_3.iterdir())
    written: dict[str, torch.Tensor] = {}
    for file in files:
        written.update(safetensors_torch.load_file(str(file)))
    _assert_weights(written, {f"model.{key}": value for key, value in full.items()})

    loaded = _run(rank_pool, job.initial_load, str(tmp_path / "fresh"), str(step_3), True)[0]
    _assert_weights(loaded, {key: value.float() for key, value in full.items()})


def test_seed_checkpoint_then_fsdp2_resume(rank_pool: PoolFactory, tmp_path: Path) -> None:
    folder = str(tmp_path / "checkpoint")
    seed = rank_pool(1).run(job.seed_checkpoint, folder, timeout_s=120)[0]
    loaded = _run(rank_pool, job.resume_from_seed, folder)[0]
    _assert_weights(loaded, seed)


def test_resume_on_another_world_size(rank_pool: PoolFactory, tmp_path: Path) -> None:
    folder = str(tmp_path / "checkpoint")
    saved = _run(rank_pool, job.train_and_save, folder)[0]
    resumed = rank_pool(1).run(job.resume_resharded, folder, timeout_s=120)[0]
    found = job.differences(saved, resumed)
    assert not found, "\n".join(found)


def _assert_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    found = job.differences(expected, actual)
    assert not found, "\n".join(found)
