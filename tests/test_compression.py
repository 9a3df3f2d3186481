"""``FileSystemWriter(path, _extensions=[ZStandard()])``: tensor chunks stored as
zstd frames, the codec recorded per chunk; checksums cover the stored bytes and
are verified before decompressing; the frame must hold exactly the chunk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
import zstandard
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import distcp
from bit_patterns import random_tensor, raw
from distcp.codecs import compress, decompress
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.metadata_file import MAGIC
from distcp.testing import RankPool

PoolFactory = Callable[[int], RankPool]
MiB = 1 << 20


def data_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("data-*.distcp"))


def body_of(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb((path / METADATA_FILE_NAME).read_bytes()[24:])
    return body


def rewrite_body(path: Path, body: dict[str, Any]) -> None:
    """Re-encode ``body`` with a correct header, so only validation objects."""
    payload = msgpack.packb(body, use_bin_type=True)
    header = MAGIC + (1).to_bytes(4, "little") + crc32c.crc32c(payload).to_bytes(4, "little")
    (path / METADATA_FILE_NAME).write_bytes(header + len(payload).to_bytes(8, "little") + payload)


def chunk(body: dict[str, Any], key: str) -> dict[str, Any]:
    entry = next(e for e in body["entries"] if e["key"] == key)
    first: dict[str, Any] = entry["chunks"][0]
    return first


def zstd_writer(path: Path, extension: Any = None) -> distcp.FileSystemWriter:
    return distcp.FileSystemWriter(path, _extensions=[extension or ZStandard()])


def test_4_mib_of_zeros_is_tiny_and_loads_bit_exact(tmp_path: Path) -> None:
    state = {"zeros": torch.zeros(1024, 1024), "noise": random_tensor((300, 7), torch.float32, 1),
             "step": 5}  # fmt: skip
    distcp.save(state, storage_writer=zstd_writer(tmp_path / "z"), no_dist=True)
    distcp.save(state, checkpoint_id=tmp_path / "raw", no_dist=True)
    assert data_bytes(tmp_path / "z") < 64 * 1024 < 4 * MiB < data_bytes(tmp_path / "raw")
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


def test_the_codec_is_recorded_per_chunk_and_incompressible_chunks_stay_raw(
    tmp_path: Path,
) -> None:
    state = {"zeros": torch.zeros(64, 64), "noise": random_tensor((64, 64), torch.uint8, 2),
             "empty": torch.zeros(0, 3), "step": 5}  # fmt: skip
    distcp.save(state, storage_writer=zstd_writer(tmp_path), no_dist=True)
    body = body_of(tmp_path)
    assert chunk(body, "zeros")["codec"] == "zstd"
    assert chunk(body, "zeros")["length"] < 64 * 64 * 4
    assert "codec" not in chunk(body, "noise") and chunk(body, "noise")["length"] == 64 * 64
    assert "codec" not in chunk(body, "empty") and chunk(body, "empty")["length"] == 0
    value = next(e for e in body["entries"] if e["key"] == "step")
    assert "codec" not in value  # values are never compressed
    fresh: dict[str, Any] = {
        "zeros": torch.ones(64, 64),
        "noise": torch.zeros(64, 64, dtype=torch.uint8),
        "empty": torch.ones(0, 3),
        "step": None,
    }
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert all(raw(fresh[k]) == raw(state[k]) for k in ("zeros", "noise", "empty"))
    assert fresh["step"] == 5


def test_a_checkpoint_without_codecs_has_no_codec_field(tmp_path: Path) -> None:
    """Additive: uncompressed checkpoints encode exactly as before."""
    distcp.save({"zeros": torch.zeros(64, 64)}, checkpoint_id=tmp_path, no_dist=True)
    assert "codec" not in chunk(body_of(tmp_path), "zeros")
    metadata = distcp.FileSystemReader(tmp_path).read_metadata()
    assert {info.codec for info in metadata.storage_data.values()} == {None}


def test_any_extension_named_stream_zstd_is_accepted(tmp_path: Path) -> None:
    class MyZstd:
        @staticmethod
        def registry_name() -> str:
            return "stream.zstd"

    assert zstd_writer(tmp_path, MyZstd()).codec == "zstd"
    assert distcp.FileSystemWriter(tmp_path).codec is None


def test_an_unknown_extension_is_refused_naming_it(tmp_path: Path) -> None:
    class Rot13:
        @staticmethod
        def registry_name() -> str:
            return "stream.rot13"

    with pytest.raises(distcp.UnsupportedStorageError, match="Rot13"):
        zstd_writer(tmp_path, Rot13())
    with pytest.raises(distcp.UnsupportedStorageError, match="object"):
        zstd_writer(tmp_path, object())


def test_a_flipped_byte_in_a_compressed_chunk_is_corruption(tmp_path: Path) -> None:
    zeros = torch.zeros(256, 256)
    distcp.save({"w": zeros}, storage_writer=zstd_writer(tmp_path), no_dist=True)
    assert chunk(body_of(tmp_path), "w")["codec"] == "zstd"
    (data,) = tmp_path.glob("data-*.distcp")
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x10
    data.write_bytes(bytes(content))
    with pytest.raises(distcp.CorruptCheckpointError, match=data.name) as caught:
        distcp.load({"w": torch.ones(256, 256)}, checkpoint_id=tmp_path, no_dist=True)
    assert "crc32c" in str(caught.value) or "checksum" in str(caught.value)


def test_a_frame_of_the_wrong_size_is_corruption_even_with_valid_checksums(
    tmp_path: Path,
) -> None:
    """A writer's (or an attacker's) frame that holds another size than the
    chunk: the checksums match the stored bytes, the size check refuses it."""
    distcp.save({"w": torch.zeros(64, 64)}, storage_writer=zstd_writer(tmp_path), no_dist=True)
    body = body_of(tmp_path)
    where = chunk(body, "w")
    (data,) = tmp_path.glob("data-*.distcp")
    frame = compress(memoryview(bytes(64 * 64 * 4 - 4)))  # one element short
    content = bytearray(data.read_bytes())
    content[where["offset"] : where["offset"] + where["length"]] = frame
    data.write_bytes(bytes(content))
    where["length"] = len(frame)
    where["crc32c"] = [crc32c.crc32c(frame)]
    body["files"][where["file"]]["size"] = len(content)
    rewrite_body(tmp_path, body)
    with pytest.raises(distcp.CorruptCheckpointError, match="claims 16380 bytes"):
        distcp.load({"w": torch.ones(64, 64)}, checkpoint_id=tmp_path, no_dist=True)


def test_decompression_is_bounded_by_the_chunk_size() -> None:
    """A frame whose header claims the chunk's size but whose blocks hold 10 MB
    (a decompression bomb) fails without producing them."""
    bomb = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(bytes(10**7)))
    assert bomb[4] >> 6 == 2 and not bomb[4] & 0x20  # 4-byte content size after a window byte
    bomb[6:10] = (100).to_bytes(4, "little")
    assert zstandard.frame_content_size(bytes(bomb)) == 100
    with pytest.raises(distcp.CorruptCheckpointError, match="does not decompress"):
        decompress(bomb, 100, file="f", offset=0)
    frame = compress(memoryview(bytes(100)))
    for damaged, problem in [
        (frame + b"\0", "followed by other bytes"),
        (frame[:-1], "truncated"),
        (b"not a frame", "no valid frame header"),
        (zstandard.ZstdCompressor(write_content_size=False).compress(bytes(100)), "content size"),
    ]:
        with pytest.raises(distcp.CorruptCheckpointError, match=problem):
            decompress(damaged, 100, file="f", offset=0)
    assert decompress(frame, 100, file="f", offset=0) == bytes(100)


def as_long_as_raw(body: dict[str, Any]) -> None:
    where = chunk(body, "w")
    where.update(length=64 * 64 * 4, crc32c=[0])
    body["files"][where["file"]]["size"] = 1 << 20  # so only the length rule objects


def value_codec(body: dict[str, Any]) -> None:
    next(e for e in body["entries"] if e["key"] == "step")["codec"] = "zstd"


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda body: chunk(body, "w").update(codec="lz4"), "unknown codec 'lz4'"),
        (lambda body: chunk(body, "w").update(codec=["zstd"]), r"unknown codec \['zstd'\]"),
        (lambda body: chunk(body, "w").update(codec=7), "unknown codec 7"),
        (value_codec, "a value cannot be zstd"),
        (as_long_as_raw, "not shorter than its 16384 raw bytes"),
    ],
)
def test_bad_codec_fields_are_format_errors(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], problem: str
) -> None:
    distcp.save({"w": torch.zeros(64, 64), "step": 1}, storage_writer=zstd_writer(tmp_path),
                no_dist=True)  # fmt: skip
    body = body_of(tmp_path)
    edit(body)
    rewrite_body(tmp_path, body)
    with pytest.raises(distcp.CheckpointFormatError, match=problem):
        distcp.FileSystemReader(tmp_path).read_metadata()


def test_a_nil_codec_reads_as_raw(tmp_path: Path) -> None:
    distcp.save({"w": torch.arange(6.0)}, checkpoint_id=tmp_path, no_dist=True)
    body = body_of(tmp_path)
    chunk(body, "w")["codec"] = None
    rewrite_body(tmp_path, body)
    fresh = {"w": torch.zeros(6)}
    distcp.load(fresh, checkpoint_id=tmp_path, no_dist=True)
    assert fresh["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def compressed_resharding(rank: int, world_size: int, path: str) -> bool:
    mesh = init_device_mesh("cpu", (world_size,))
    full = random_tensor((8, 6), torch.float32, 3)
    state = {
        "zeros": distribute_tensor(torch.zeros(1024, 1024), mesh, [Shard(0)], src_data_rank=None),
        "w": distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None),
    }
    distcp.save(state, storage_writer=zstd_writer(Path(path)))
    target = {"w": distribute_tensor(torch.zeros(8, 6), mesh, [Shard(1)], src_data_rank=None)}
    distcp.load(target, checkpoint_id=path)  # 2 ranks, resharded rows -> columns
    expected = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
    return raw(target["w"].to_local()) == raw(expected.to_local())


def test_compressed_shards_of_2_ranks_load_resharded_and_on_1_rank(
    tmp_path: Path, rank_pool: PoolFactory
) -> None:
    assert rank_pool(2).run(compressed_resharding, str(tmp_path)) == [True, True]
    assert data_bytes(tmp_path) < 64 * 1024
    whole = {"zeros": torch.ones(1024, 1024), "w": torch.zeros(8, 6)}
    distcp.load(whole, checkpoint_id=tmp_path, no_dist=True)  # Shard(0) on 2 ranks -> 1 rank
    assert raw(whole["zeros"]) == raw(torch.zeros(1024, 1024))
    assert raw(whole["w"]) == raw(random_tensor((8, 6), torch.float32, 3))


def test_torch_dcp_load_drives_distcps_reader_over_compressed_chunks(tmp_path: Path) -> None:
    state = {"zeros": torch.zeros(128, 128), "noise": random_tensor((9, 5), torch.bfloat16, 4)}
    distcp.save(state, storage_writer=zstd_writer(tmp_path), no_dist=True)
    fresh = {"zeros": torch.ones(128, 128), "noise": torch.zeros(9, 5, dtype=torch.bfloat16)}
    torch_dcp.load(fresh, storage_reader=distcp.FileSystemReader(tmp_path), no_dist=True)
    assert raw(fresh["zeros"]) == raw(state["zeros"]) and raw(fresh["noise"]) == raw(state["noise"])
