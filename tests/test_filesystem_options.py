"""FileSystemWriter / FileSystemReader take exactly DCP's options (no silent
drops), compress with DCP's ZStandard extension, and complete checkpoints
answer the ``<dir>/.metadata`` probe that checkpoint managers use."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.filesystem.layout import METADATA_FILE_NAME, PROBE_FILE_NAME
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]


def data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("data-*.distcp"))


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("typo", ["sync_file", "verify_checksum", "overwite"])
def test_unknown_options_raise(tmp_path: Path, typo: str) -> None:
    with pytest.raises(TypeError, match=typo):
        distcp.FileSystemWriter(tmp_path, **{typo: False})
    with pytest.raises(TypeError, match=typo):
        distcp.FileSystemReader(tmp_path, **{typo: False})


def test_safetensors_serialization_is_refused_naming_the_alternative(tmp_path: Path) -> None:
    with pytest.raises(distcp.UnsupportedStorageError, match="HuggingFaceStorageWriter"):
        distcp.FileSystemWriter(tmp_path, serialization_format=SerializationFormat.SAFETENSORS)
    distcp.FileSystemWriter(tmp_path, serialization_format=SerializationFormat.TORCH_SAVE)


def test_an_unknown_extension_is_refused(tmp_path: Path) -> None:
    class Rot13:
        @staticmethod
        def registry_name() -> str:
            return "stream.rot13"

    with pytest.raises(distcp.UnsupportedStorageError, match="Rot13"):
        distcp.FileSystemWriter(tmp_path, _extensions=[Rot13()])


def test_bad_numbers_are_typed_value_errors(tmp_path: Path) -> None:
    with pytest.raises(distcp.CheckpointArgumentError, match="thread_count"):
        distcp.FileSystemWriter(tmp_path, thread_count=0)
    with pytest.raises(ValueError, match="checksum_block_size"):
        distcp.FileSystemWriter(tmp_path, checksum_block_size=0)


def test_a_load_records_its_load_id(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(2)}, checkpoint_id=tmp_path, no_dist=True)
    reader = distcp.FileSystemReader(tmp_path)
    metadata = reader.read_metadata()
    assert metadata.storage_meta is not None and metadata.storage_meta.load_id == reader.load_id
    reader.reset()
    assert (
        reader.read_metadata().storage_meta.load_id
        == reader.load_id
        != metadata.storage_meta.load_id
    )


# ------------------------------------------------------------------ compression


def test_zstd_compresses_and_loads_bit_exact(tmp_path: Path) -> None:
    state = {"zeros": torch.zeros(1024, 1024), "noise": random_tensor((300, 7), torch.float32, 1),
             "step": 5}  # fmt: skip
    distcp.save(
        state, storage_writer=distcp.FileSystemWriter(tmp_path / "z", _extensions=[ZStandard()]),
        no_dist=True,
    )  # fmt: skip
    distcp.save(state, checkpoint_id=tmp_path / "raw", no_dist=True)
    assert data_bytes(tmp_path / "z") < 64 * 1024 < data_bytes(tmp_path / "raw")
    fresh: dict[str, Any] = {"zeros": torch.ones(1024, 1024), "noise": torch.zeros(300, 7),
                             "step": None}  # fmt: skip
    reader = distcp.FileSystemReader(tmp_path / "z")
    distcp.load(fresh, storage_reader=reader, no_dist=True)
    assert raw(fresh["zeros"]) == raw(state["zeros"]) and raw(fresh["noise"]) == raw(state["noise"])
    assert fresh["step"] == 5
    assert reader.report.bytes_verified == reader.report.bytes_read  # every stored byte checked
    part = {"noise": torch.zeros(300, 7)}
    distcp.load(part, checkpoint_id=tmp_path / "z", no_dist=True)  # a subset of keys
    assert raw(part["noise"]) == raw(state["noise"])


def test_a_flipped_byte_in_a_compressed_chunk_is_corruption(tmp_path: Path) -> None:
    noise = random_tensor((256, 256), torch.float32, 2)
    writer = distcp.FileSystemWriter(tmp_path, _extensions=[ZStandard()])
    distcp.save({"w": noise}, storage_writer=writer, no_dist=True)
    (data,) = tmp_path.glob("data-*.distcp")
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x10
    data.write_bytes(bytes(content))
    with pytest.raises(distcp.CorruptCheckpointError, match=data.name):
        distcp.load({"w": torch.zeros(256, 256)}, checkpoint_id=tmp_path, no_dist=True)


def compressed_resharding(rank: int, world_size: int, path: str) -> bool:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((8, 6), torch.float32, 3)
    saved = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    writer = distcp.FileSystemWriter(path, _extensions=[ZStandard()])
    distcp.save({"w": saved}, storage_writer=writer)
    target = {"w": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)], src_data_rank=None)}
    distcp.load(target, checkpoint_id=path)
    expected = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
    return raw(target["w"].to_local()) == raw(expected.to_local())


def test_compressed_chunks_reshard_on_two_ranks(tmp_path: Path, rank_pool: PoolFactory) -> None:
    assert rank_pool(2).run(compressed_resharding, str(tmp_path)) == [True, True]
    whole = {"w": torch.zeros(8, 6)}
    distcp.load(whole, checkpoint_id=tmp_path, no_dist=True)  # 2 ranks -> 1 process
    assert raw(whole["w"]) == raw(random_tensor((8, 6), torch.float32, 3))


# ------------------------------------------------------------------ the .metadata probe


def test_a_complete_checkpoint_answers_the_metadata_probe(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path, no_dist=True)
    assert (tmp_path / PROBE_FILE_NAME).is_file()
    distcp.save({"x": torch.zeros(3)}, checkpoint_id=tmp_path, no_dist=True)  # overwritten
    assert (tmp_path / PROBE_FILE_NAME).is_file() and (tmp_path / METADATA_FILE_NAME).is_file()


def test_a_crashed_first_save_leaves_no_probe(tmp_path: Path) -> None:
    class Crash(distcp.DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            raise OSError("disk gone")

    with pytest.raises(distcp.CheckpointError):
        distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path, planner=Crash(), no_dist=True)
    assert not (tmp_path / PROBE_FILE_NAME).exists()
    assert not (tmp_path / METADATA_FILE_NAME).exists()


class Payload:
    """Unpickling this would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_torch_dcp_pointed_at_a_distcp_checkpoint_fails_unpickling_nothing(tmp_path: Path) -> None:
    distcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    probe = (tmp_path / "ckpt" / PROBE_FILE_NAME).read_bytes()
    assert probe.startswith(b"#")
    with pytest.raises(pickle.UnpicklingError, match="invalid load key"):
        pickle.loads(probe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BaseException, match="invalid load key"):
            torch_dcp.load({"x": torch.zeros(3)}, checkpoint_id=tmp_path / "ckpt")
    # The check above is meaningful: a real pickle there would have run.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_torch_driving_a_resharding_load_still_verifies_every_byte(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    """torch's dcp.load never exchanges distcp's masked crcs, so the reader
    verifies every block whole when torch drives it: a flipped byte fails."""
    assert rank_pool(2).run(save_rows, str(tmp_path)) == [None, None]
    (data,) = sorted(tmp_path.glob("data-*-00000-*.distcp"))[:1]
    content = bytearray(data.read_bytes())
    content[5] ^= 0x01
    data.write_bytes(bytes(content))
    assert rank_pool(2).run(torch_loads_columns, str(tmp_path)) == ["corrupt", "corrupt"]


def save_rows(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((64, 64), torch.float32, 4)
    distcp.save({"w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)},
                checkpoint_id=path)  # fmt: skip


def torch_loads_columns(rank: int, world_size: int, path: str) -> str:
    mesh = init_device_mesh("cpu", (world_size,))
    target = {"w": distribute_tensor(torch.zeros(64, 64), mesh, [Shard(1)], src_data_rank=None)}
    try:
        torch_dcp.load(target, storage_reader=distcp.FileSystemReader(path),
                       planner=distcp.DefaultLoadPlanner())  # fmt: skip
    except BaseException as error:  # torch wraps it in its CheckpointException
        return "corrupt" if "corrupt" in str(error) else f"other: {error}"
    return "loaded"
