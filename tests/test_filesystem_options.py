"""FileSystemWriter / FileSystemReader take exactly torch DCP 2.13's options,
in DCP's order, and nothing else: an unknown keyword raises ``TypeError``, a
DCP option distcp cannot honour raises naming the alternative.
(Compression: test_compression.py; the ``.metadata`` probe: test_metadata_probe.py.)"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("name", ["FileSystemWriter", "FileSystemReader"])
def test_the_parameters_are_torch_dcps_in_dcps_order(name: str) -> None:
    """Every positional-or-keyword parameter of torch's class, same name, same
    place, same default (thread_count aside: distcp's default is its knob);
    distcp's own extras are keyword-only."""
    theirs = inspect.signature(getattr(torch_dcp, name).__init__).parameters
    ours = inspect.signature(getattr(distcp, name).__init__).parameters
    positional = [p for p in ours.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == list(theirs)
    for parameter in positional:
        if parameter.name != "thread_count":
            assert parameter.default == theirs[parameter.name].default, parameter.name
    extras = [p for p in ours.values() if p.name not in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())


def test_every_dcp_option_is_accepted_by_keyword_and_by_position(tmp_path: Path) -> None:
    options = dict(
        single_file_per_rank=False, sync_files=False, thread_count=3,
        per_thread_copy_ahead=1000, cache_staged_state_dict=True, overwrite=False,
        _extensions=[ZStandard()], serialization_format=SerializationFormat.TORCH_SAVE,
    )  # fmt: skip
    for writer in (
        distcp.FileSystemWriter(tmp_path, **options),  # type: ignore[arg-type]
        distcp.FileSystemWriter(tmp_path, *options.values()),  # type: ignore[arg-type]
    ):
        assert (writer.single_file_per_rank, writer.sync_files, writer.thread_count) == (
            False, False, 3
        )  # fmt: skip
        assert (writer.overwrite, writer.codec) == (False, "zstd")
    reader = distcp.FileSystemReader(tmp_path, None, thread_count=1, verify_checksums=False)
    assert (reader.thread_count, reader.verify_checksums) == (1, False)


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


# ------------------------------------------------------------------ verification


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
