"""A miniature torchtitan training job whose checkpoints go through distcp.

``tests/test_torchtitan.py`` runs these functions on gloo ranks (RankPool).
Everything checkpoint-related is torchtitan's own code (0.3): its
``CheckpointManager`` built from its ``CheckpointManager.Config``, its
``ModelWrapper``, ``OptimizersContainer`` (``default_adamw``),
``LRSchedulersContainer``, ``ParallelAwareDataloader`` over a stateful dataset,
and a train state shaped like torchtitan's ``Trainer`` (``step``,
``ntokens_seen``). Only the model (a 2-layer MLP under FSDP2) and the data are
ours, small enough for a 2-core machine.

:func:`bound_to_distcp` does what ``import distcp as dcp`` does in a user's
fork of torchtitan: it points the checkpoint module's ``dcp`` and the names it
imports from ``torch.distributed.checkpoint`` at distcp's twins, for the
duration of a job (RankPool workers are reused, so it puts torch's back).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import IterableDataset
from torchtitan.components.checkpointer import dcp as titan_dcp  # type: ignore[import-untyped]
from torchtitan.components.dataloader import ParallelAwareDataloader  # type: ignore[import-untyped]
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # type: ignore[import-untyped]
from torchtitan.protocols.state_dict_adapter import StateDictAdapter  # type: ignore[import-untyped]

import distcp

#: The names torchtitan's checkpoint module takes from torch.distributed.checkpoint,
#: and where distcp has each (module, attribute). Missing ones stay torch's.
DISTCP_TWINS: dict[str, tuple[str, str]] = {
    "dcp": ("distcp", ""),
    "HuggingFaceStorageWriter": ("distcp.hf_storage", "HuggingFaceStorageWriter"),
    "DefaultStager": ("distcp.staging", "DefaultStager"),
    "StagingOptions": ("distcp.staging", "StagingOptions"),
    "AsyncCheckpointerType": ("distcp.state_dict_saver", "AsyncCheckpointerType"),
    "AsyncSaveResponse": ("distcp.state_dict_saver", "AsyncSaveResponse"),
}

IN_FEATURES, HIDDEN, OUT_FEATURES, BATCH = 8, 16, 4, 2


@contextlib.contextmanager
def bound_to_distcp() -> Iterator[list[str]]:
    """Point torchtitan's checkpoint module at distcp; yields the names that
    stayed torch's because distcp has no twin (reported by the tests)."""
    saved: dict[str, Any] = {}
    missing: list[str] = []
    for name, (module_name, attribute) in DISTCP_TWINS.items():
        try:
            module = importlib.import_module(module_name)
            twin = getattr(module, attribute) if attribute else module
        except (ImportError, AttributeError):
            missing.append(name)
            continue
        saved[name] = getattr(titan_dcp, name)
        setattr(titan_dcp, name, twin)
    try:
        yield missing
    finally:
        for name, value in saved.items():
            setattr(titan_dcp, name, value)


# --- the model, the data and the train state ------------------------------------------------


class MLP(nn.Module):
    """Two linear layers; each and the root are fully_shard units."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT_FEATURES)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


class SyntheticDataset(IterableDataset[tuple[torch.Tensor, torch.Tensor]], Stateful):
    """Endless deterministic samples for one data-parallel rank; its position
    is state, as in torchtitan's HuggingFaceTextDataset (``sample_idx``)."""

    def __init__(self, dp_rank: int) -> None:
        self.dp_rank = dp_rank
        self.sample_idx = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            generator = torch.Generator().manual_seed(1000 * self.dp_rank + self.sample_idx)
            self.sample_idx += 1
            yield (
                torch.randn(IN_FEATURES, generator=generator),
                torch.randn(OUT_FEATURES, generator=generator),
            )

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self.sample_idx}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sample_idx = state_dict["sample_idx"]


class TrainState(Stateful):
    """What torchtitan 0.3's Trainer checkpoints as ``train_state`` (itself)."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]


class LegacyTrainState(Stateful):
    """torchtitan's TrainState before the Trainer class (2024, ``train.py``):
    losses and log steps as ``torch.save`` blobs in ``BytesIO`` values, the step
    as an int32 tensor. Jobs still resume from checkpoints written this way."""

    def __init__(self) -> None:
        self.step = 0
        self.global_avg_losses: list[float] = []
        self.log_steps: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        losses, steps = BytesIO(), BytesIO()
        torch.save(self.global_avg_losses, losses)
        torch.save(self.log_steps, steps)
        return {
            "step": torch.tensor(self.step, dtype=torch.int32),
            "global_avg_losses": losses,
            "log_steps": steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"].item())
        state_dict["global_avg_losses"].seek(0)
        self.global_avg_losses = torch.load(state_dict["global_avg_losses"], weights_only=False)
        state_dict["log_steps"].seek(0)
        self.log_steps = torch.load(state_dict["log_steps"], weights_only=False)


class HFAdapter(StateDictAdapter):  # type: ignore[misc]
    """torchtitan's StateDictAdapter for the MLP: HF names ``model.fc1.weight``,
    …; with ``sharded``, an index mapping puts fc1 and fc2 in two files (the
    path that saves to ``sharded/`` and consolidates)."""

    def __init__(self, hf_assets_path: str | None = None, *, sharded: bool = False) -> None:
        super().__init__(model_config=None, hf_assets_path=hf_assets_path)
        if sharded:
            self.fqn_to_index_mapping = {
                f"model.{layer}.{kind}": index
                for index, layer in ((1, "fc1"), (2, "fc2"))
                for kind in ("weight", "bias")
            }

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {f"model.{key}": value for key, value in state_dict.items()}

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return {key.removeprefix("model."): value for key, value in hf_state_dict.items()}

    def get_hf_storage_reader(self, path: str, from_quantized: bool = False) -> Any:
        from distcp.hf_storage import HuggingFaceStorageReader  # a user's adapter, ported

        return HuggingFaceStorageReader(path)


# --- a job -----------------------------------------------------------------------------------


@dataclass
class JobOptions:
    """The checkpoint config of one job (torchtitan's field names)."""

    folder: str
    async_mode: str = "disabled"
    interval: int = 2
    last_save_model_only: bool = True
    last_save_in_hf: bool = False
    export_dtype: str = "float32"
    initial_load_path: str | None = None
    initial_load_in_hf: bool = False
    initial_load_model_only: bool = True
    load_step: int = -1
    exclude_from_loading: tuple[str, ...] = ()
    hf_sharded: bool = False
    legacy_train_state: bool = False
    fully_shard: bool = True


class Job:
    """One rank's trainer: model, optimizers, schedulers, data, checkpointer,
    wired as torchtitan's Trainer wires them."""

    def __init__(self, rank: int, world_size: int, seed: int, options: JobOptions) -> None:
        model = MLP(seed)
        if options.fully_shard:
            mesh = init_device_mesh("cpu", (world_size,))
            fully_shard(model.fc1, mesh=mesh)
            fully_shard(model.fc2, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizers = default_adamw(lr=1e-2, implementation="for-loop").build(
            model_parts=[model]
        )
        self.lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
            optimizers=self.optimizers, training_steps=10
        )
        self.dataloader = ParallelAwareDataloader(
            SyntheticDataset(rank), dp_rank=rank, dp_world_size=world_size, batch_size=BATCH
        )
        self.batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None  # after a load
        self.train_state: TrainState | LegacyTrainState = (
            LegacyTrainState() if options.legacy_train_state else TrainState()
        )
        config = titan_dcp.CheckpointManager.Config(
            enable=True,
            folder=options.folder,
            interval=options.interval,
            async_mode=options.async_mode,
            keep_latest_k=0,
            last_save_model_only=options.last_save_model_only,
            last_save_in_hf=options.last_save_in_hf,
            export_dtype=options.export_dtype,
            initial_load_path=options.initial_load_path,
            initial_load_in_hf=options.initial_load_in_hf,
            initial_load_model_only=options.initial_load_model_only,
            load_step=options.load_step,
            exclude_from_loading=list(options.exclude_from_loading),
        )
        self.checkpointer = config.build(
            dataloader=self.dataloader,
            model_parts=[model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=HFAdapter(sharded=options.hf_sharded),
            base_folder="",
        )

    def train_step(self) -> torch.Tensor:
        """One step in the Trainer's order (staging waited for before the
        optimizer changes the parameters); the loss."""
        if self.batches is None:  # as the Trainer: iterate only after checkpoint.load()
            self.batches = iter(self.dataloader)
        x, y = next(self.batches)
        loss = F.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()
        self.optimizers.zero_grad()
        self.train_state.step += 1
        if isinstance(self.train_state, TrainState):
            self.train_state.ntokens_seen += BATCH * IN_FEATURES
        else:
            # global, as torchtitan logged it: every rank saves the same value under
            # one key (a per-rank value there would be deduplicated, as in torch DCP)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
            self.train_state.global_avg_losses.append(float(global_loss))
            self.train_state.log_steps.append(self.train_state.step)
        return loss.detach().clone()

    def train(self, steps: int, *, save: bool = True, last_step: int | None = None) -> None:
        for _ in range(steps):
            self.train_step()
            if save:
                step = self.train_state.step
                self.checkpointer.save(step, last_step=step == last_step)

    def snapshot(self, copy: Any = None) -> dict[str, Any]:
        """This rank's state, copied: local shards of the model and of the
        optimizer's flat state (or, with ``copy=full``, whole tensors), the
        schedulers' and the train state."""
        copy = copy or local
        train_state = {
            key: value.clone() if isinstance(value, torch.Tensor) else value
            for key, value in self.train_state.state_dict().items()
            if not isinstance(value, BytesIO)
        }
        if isinstance(self.train_state, LegacyTrainState):
            train_state["global_avg_losses"] = list(self.train_state.global_avg_losses)
            train_state["log_steps"] = list(self.train_state.log_steps)
        return {
            "model": {key: copy(value) for key, value in self.model.state_dict().items()},
            "optimizer": {key: copy(value) for key, value in self.optimizers.state_dict().items()},
            "lr_scheduler": self.lr_schedulers.state_dict(),
            "last_lr": [s.get_last_lr() for s in self.lr_schedulers],
            "train_state": train_state,
        }

    def close(self) -> None:
        self.checkpointer.maybe_wait_for_saving()
        self.checkpointer.close()


def local(value: Any) -> Any:
    """A copy of ``value`` as this rank holds it (a DTensor's local shard)."""
    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def full(value: Any) -> Any:
    """A copy of ``value`` whole (a DTensor gathered)."""
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    return local(value)


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected``, bit for bit; [] if nowhere."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected a dict, got {type(actual).__name__}"]
        found = [f"{path}.{key}: missing" for key in expected if key not in actual]
        found += [f"{path}.{key}: unexpected" for key in actual if key not in expected]
        for key in expected:
            if key in actual:
                found += differences(expected[key], actual[key], f"{path}.{key}")
        return found
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return [f"{path}: expected a tensor, got {type(actual).__name__}"]
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return [
                f"{path}: {actual.dtype}{list(actual.shape)}, "
                f"expected {expected.dtype}{list(expected.shape)}"
            ]
        if not torch.equal(_bytes(expected), _bytes(actual)):
            return [f"{path}: values differ"]
        return []
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: {actual!r}, expected {expected!r}"]
    return []


def check_same(expected: Any, actual: Any, what: str) -> None:
    found = differences(expected, actual)
    if found:
        raise AssertionError(f"{what} differs from what was saved:\n  " + "\n  ".join(found))


def listing(folder: str) -> dict[str, list[str]]:
    """Each step folder under ``folder`` and the files in it (for messages)."""
    folder = folder.removeprefix("file://")
    if not os.path.isdir(folder):
        return {}
    return {name: sorted(os.listdir(os.path.join(folder, name))) for name in os.listdir(folder)}


def written_by(folder: str, step: str) -> None:
    """That distcp wrote ``folder/step`` (its own metadata file), not torch
    DCP: the binding took. (The ``.metadata`` probe is checked by torchtitan's
    own ``_find_load_step``.)"""
    names = set(os.listdir(os.path.join(folder.removeprefix("file://"), step)))
    if ".metadata.distcp" not in names:
        raise AssertionError(f"{step} was not written by distcp: it holds {sorted(names)}")


# --- the scenarios (run on every rank) -------------------------------------------------------


def save_and_resume(rank: int, world_size: int, folder: str, async_mode: str) -> list[str]:
    """Train 4 steps saving at 2 and 4, then restart with other weights and
    resume at 4 (the latest found), and separately load step 2 by number:
    model, optimizer, schedulers, train state bit-exact; the next step's loss
    equal to the uninterrupted run's. Returns the names distcp lacked."""
    with bound_to_distcp() as missing:
        job = Job(rank, world_size, seed=0, options=JobOptions(folder, async_mode=async_mode))
        job.train(2)
        job.checkpointer.maybe_wait_for_saving()
        at_2 = job.snapshot()
        job.train(2)
        job.checkpointer.maybe_wait_for_saving()
        at_4 = job.snapshot()
        next_loss = job.train_step()
        stager = job.checkpointer.stager
        job.close()
        dist.barrier()
        written_by(folder, "step-4")
        if async_mode == "async_with_pinned_mem" and type(stager).__module__ != "distcp.staging":
            raise AssertionError(f"torchtitan staged with {type(stager)}, not distcp's stager")

        resumed = Job(rank, world_size, seed=1, options=JobOptions(folder, async_mode=async_mode))
        if not differences(at_4["model"], resumed.snapshot()["model"]):
            raise AssertionError("the restarted job's weights equal the saved ones: no test")
        problems: list[str] = []
        found = resumed.checkpointer._find_load_step()
        if found != 4:  # go on with the step named, to learn what else breaks
            problems.append(
                f"torchtitan's _find_load_step() found step {found}, expected 4: it probes "
                f"step-N/.metadata; the folder holds {listing(folder)}"
            )
        if not resumed.checkpointer.load(step=-1 if found == 4 else 4):
            raise AssertionError("CheckpointManager.load() found nothing to load")
        check_same(at_4, resumed.snapshot(), f"rank {rank}: the state resumed at step 4")
        loss = resumed.train_step()
        if not torch.equal(loss, next_loss):
            raise AssertionError(f"step 5 loss {loss.item()!r}, uninterrupted {next_loss.item()!r}")
        resumed.close()

        options = JobOptions(
            folder, async_mode=async_mode, load_step=2, exclude_from_loading=("dataloader",)
        )  # a partial load: the checkpoint holds keys that are not asked for
        older = Job(rank, world_size, seed=2, options=options)
        if not older.checkpointer.load(step=2):
            raise AssertionError("CheckpointManager.load(step=2) found nothing to load")
        check_same(at_2, older.snapshot(), f"rank {rank}: the state loaded at step 2")
        older.close()
        dist.barrier()
        if problems:
            raise AssertionError("\n".join(problems))
        return missing


def legacy_train_state(rank: int, world_size: int, folder: str) -> None:
    """The 2024 TrainState (BytesIO values, an int32 step tensor) saves and
    resumes through the CheckpointManager."""
    with bound_to_distcp():
        options = JobOptions(folder, legacy_train_state=True)
        job = Job(rank, world_size, seed=0, options=options)
        job.train(2)
        saved = job.snapshot()
        job.close()
        dist.barrier()
        resumed = Job(rank, world_size, seed=1, options=options)
        if not resumed.checkpointer.load():
            raise AssertionError("CheckpointManager.load() found nothing to load")
        check_same(saved, resumed.snapshot(), f"rank {rank}: the state resumed at step 2")
        resumed.close()
        dist.barrier()


def export_last_step(rank: int, world_size: int, folder: str, in_hf: bool, sharded: bool) -> Any:
    """Train 3 steps (saving at 2) and save the last as torchtitan's final
    model-only bf16 export, natively or as HF safetensors. Returns rank 0's
    full bf16 weights (gathered from the live model) for the caller to check
    the files against; checks a native export here by loading it back."""
    with bound_to_distcp():
        options = JobOptions(
            folder,
            last_save_in_hf=in_hf,
            export_dtype="bfloat16",
            hf_sharded=sharded,
        )
        job = Job(rank, world_size, seed=0, options=options)
        job.train(3, last_step=3)
        job.close()
        dist.barrier()
        full = {
            key: value.full_tensor().to(torch.bfloat16) if isinstance(value, DTensor) else value
            for key, value in job.model.state_dict().items()
        }
        if not in_hf:
            step_3 = os.path.join(folder, "step-3")
            metadata = distcp.FileSystemReader(step_3).read_metadata()
            keys = set(metadata.state_dict_metadata)
            if keys != set(full):
                raise AssertionError(
                    f"the model-only export holds {sorted(keys)}, expected {sorted(full)}"
                )
            target = {
                key: torch.distributed.tensor.zeros(
                    value.shape,
                    dtype=torch.bfloat16,
                    device_mesh=value.device_mesh,
                    placements=value.placements,
                )
                for key, value in job.model.state_dict().items()
            }
            distcp.load(target, checkpoint_id=step_3)
            gathered = {key: value.full_tensor() for key, value in target.items()}
            check_same(full, gathered, f"rank {rank}: the bf16 export")
        return full if rank == 0 else None


def initial_load(rank: int, world_size: int, folder: str, path: str, in_hf: bool) -> Any:
    """A fresh job (empty checkpoint folder) with ``initial_load_path`` set
    loads only the model from it (natively or from HF safetensors); returns
    the loaded model's full weights from rank 0."""
    with bound_to_distcp():
        options = JobOptions(folder, initial_load_path=path, initial_load_in_hf=in_hf)
        job = Job(rank, world_size, seed=5, options=options)
        before = {key: local(value) for key, value in job.model.state_dict().items()}
        if not job.checkpointer.load():
            raise AssertionError("CheckpointManager.load() did not take initial_load_path")
        if job.train_state.step != 0:
            raise AssertionError(f"a model-only initial load set step {job.train_state.step}")
        full = {key: value.full_tensor() for key, value in job.model.state_dict().items()}
        after = {key: local(value) for key, value in job.model.state_dict().items()}
        if not differences(before, after):
            raise AssertionError("initial load left the model unchanged")
        job.close()
        dist.barrier()
        return full if rank == 0 else None


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that bit-exact means bit-exact (NaN, -0.0)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def seed_checkpoint(rank: int, world_size: int, folder: str) -> dict[str, torch.Tensor]:
    """What ``train.py --checkpoint.create_seed_checkpoint`` does, on one rank
    with an unsharded model: ``save(curr_step=0, last_step=True)``, a
    model-only step-0 checkpoint. Returns the weights."""
    with bound_to_distcp():
        job = Job(rank, world_size, seed=7, options=JobOptions(folder, fully_shard=False))
        job.checkpointer.save(curr_step=0, last_step=True)
        job.close()
        written_by(folder, "step-0")
        return {key: value.detach().clone() for key, value in job.model.state_dict().items()}


def resume_from_seed(rank: int, world_size: int, folder: str) -> Any:
    """An FSDP2 job whose folder holds only the seed checkpoint finds step 0
    and loads only the model from it, resharded; rank 0's full weights."""
    with bound_to_distcp():
        job = Job(rank, world_size, seed=8, options=JobOptions(folder))
        found = job.checkpointer._find_load_step()
        if found != 0:
            raise AssertionError(f"_find_load_step() found {found} in {listing(folder)}")
        if not job.checkpointer.load():
            raise AssertionError("CheckpointManager.load() did not find the seed checkpoint")
        if job.train_state.step != 0:
            raise AssertionError(f"the seed checkpoint set step {job.train_state.step}")
        full = {key: value.full_tensor() for key, value in job.model.state_dict().items()}
        job.train(1, save=False)  # the optimizer state starts afresh, as in torchtitan
        job.close()
        dist.barrier()
        return full if rank == 0 else None


def train_and_save(rank: int, world_size: int, folder: str) -> Any:
    """4 steps, saving at 2 and 4; rank 0's whole state at step 4."""
    with bound_to_distcp():
        job = Job(rank, world_size, seed=0, options=JobOptions(folder))
        job.train(4)
        state = job.snapshot(full)
        job.close()
        dist.barrier()
        return state if rank == 0 else None


def resume_resharded(rank: int, world_size: int, folder: str) -> Any:
    """Resume at the latest step under another number of ranks, the data
    position left out as torchtitan requires (its dataloader does not
    reshard); this rank's whole state after the load."""
    with bound_to_distcp():
        options = JobOptions(folder, exclude_from_loading=("dataloader",))
        job = Job(rank, world_size, seed=3, options=options)
        if not job.checkpointer.load():
            raise AssertionError(f"CheckpointManager.load() found nothing in {listing(folder)}")
        state = job.snapshot(full)
        job.train(1, save=False)
        job.close()
        dist.barrier()
        return state
