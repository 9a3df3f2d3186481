"""DCP's other stream transforms (``_extensions=[SomeStreamTransformExtension()]``):
every item goes through the user's transform, the metadata names it
(``ext:<descriptor>``), checksums cover the stored bytes, and loading runs
the transform only when the caller hands the reader a registry holding it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import IO, Any

import msgpack
import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint._extension import (
    ExtensionRegistry,
    StreamTransformExtension,
    ZStandard,
)

import distcp
import fuzz_metadata
from bit_patterns import random_tensor, raw
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.metadata_file import decode_metadata

KEY = 0x5A


class _Xor(io.RawIOBase):
    def __init__(self, stream: IO[bytes], writing: bool) -> None:
        self.stream, self.writing = stream, writing

    def writable(self) -> bool:
        return self.writing

    def readable(self) -> bool:
        return not self.writing

    def write(self, data: Any) -> int:
        return self.stream.write(bytes(b ^ KEY for b in bytes(data)))

    def readinto(self, buffer: Any) -> int:
        chunk = self.stream.read(len(buffer))
        buffer[: len(chunk)] = bytes(b ^ KEY for b in chunk)
        return len(chunk)

    def close(self) -> None:
        if self.writing:
            self.stream.close()
        super().close()


class XorCipher(StreamTransformExtension):
    """A stand-in for an encryption at rest: every byte XORed with a key."""

    def __init__(self, version: str = "1") -> None:
        super().__init__()
        self.version = version

    @staticmethod
    def registry_name() -> str:
        return "test.xor"

    @staticmethod
    def from_descriptor(version: str) -> XorCipher:
        return XorCipher(version)

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/{self.version}"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return io.BufferedWriter(_Xor(output, writing=True))

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        if self.version == "short":  # a broken decoder: one byte too few
            data = input.read()
            return io.BytesIO(bytes(b ^ KEY for b in data[:-1]))
        return io.BufferedReader(_Xor(input, writing=False))


def registry() -> ExtensionRegistry:
    found = ExtensionRegistry()
    found.register(XorCipher)
    return found


def state() -> dict[str, Any]:
    return {
        "w": random_tensor((64, 33), torch.float32, 7),
        "ids": torch.arange(1000, dtype=torch.int64),
        "config": {"name": "secret-run", "lr": 0.5},
    }


def blank() -> dict[str, Any]:
    return {
        "w": torch.zeros(64, 33),
        "ids": torch.zeros(1000, dtype=torch.int64),
        "config": {"name": None, "lr": None},
    }


def save_transformed(path: Path) -> dict[str, Any]:
    saved = state()
    writer = distcp.FileSystemWriter(path, _extensions=[XorCipher()])
    distcp.save(saved, storage_writer=writer, no_dist=True)
    return saved


def test_every_item_is_stored_transformed_and_loads_through_the_registry(tmp_path: Path) -> None:
    saved = save_transformed(tmp_path)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("data-*.distcp"))
    assert b"secret-run" not in stored and raw(saved["ids"])[:64] not in stored
    body = msgpack.unpackb((tmp_path / METADATA_FILE_NAME).read_bytes()[24:])
    codecs = {e["key"]: (e.get("codec") or e["chunks"][0].get("codec")) for e in body["entries"]}
    assert set(codecs.values()) == {"ext:test.xor/1"}, codecs  # tensors and values alike
    loaded = blank()
    reader = distcp.FileSystemReader(tmp_path, _extension_registry=registry())
    distcp.load(loaded, storage_reader=reader, no_dist=True)
    assert raw(loaded["w"]) == raw(saved["w"]) and raw(loaded["ids"]) == raw(saved["ids"])
    assert loaded["config"] == saved["config"]
    assert reader.report.bytes_verified == reader.report.bytes_read  # stored bytes checked


def test_torch_dcp_load_drives_the_same_reader(tmp_path: Path) -> None:
    saved = save_transformed(tmp_path)
    loaded = {"w": torch.zeros(64, 33)}
    torch_dcp.load(
        loaded, storage_reader=distcp.FileSystemReader(tmp_path, _extension_registry=registry())
    )
    assert raw(loaded["w"]) == raw(saved["w"])


def test_a_reader_without_the_transform_refuses_naming_it(tmp_path: Path) -> None:
    save_transformed(tmp_path)
    with pytest.raises(distcp.UnsupportedStorageError, match=r"test\.xor/1.*_extension_registry"):
        distcp.load(blank(), checkpoint_id=tmp_path, no_dist=True)


def test_a_transform_that_decodes_to_the_wrong_size_is_corruption(tmp_path: Path) -> None:
    writer = distcp.FileSystemWriter(tmp_path, _extensions=[XorCipher("short")])
    distcp.save({"w": torch.ones(16)}, storage_writer=writer, no_dist=True)
    reader = distcp.FileSystemReader(tmp_path, _extension_registry=registry())
    with pytest.raises(distcp.CorruptCheckpointError, match=r"decodes through 'test\.xor/short'"):
        distcp.load({"w": torch.zeros(16)}, storage_reader=reader, no_dist=True)


def test_a_flipped_stored_byte_is_caught_before_decoding(tmp_path: Path) -> None:
    save_transformed(tmp_path)
    data = max(tmp_path.glob("data-*.distcp"), key=lambda p: p.stat().st_size)
    content = bytearray(data.read_bytes())
    content[100] ^= 0x01
    data.write_bytes(bytes(content))
    reader = distcp.FileSystemReader(tmp_path, _extension_registry=registry())
    with pytest.raises(distcp.CorruptCheckpointError, match="checksum"):
        distcp.load(blank(), storage_reader=reader, no_dist=True)


def test_one_extension_at_a_time(tmp_path: Path) -> None:
    with pytest.raises(distcp.UnsupportedStorageError, match="one extension at a time"):
        distcp.FileSystemWriter(tmp_path, _extensions=[ZStandard(), XorCipher()])
    with pytest.raises(distcp.UnsupportedStorageError, match="StreamTransformExtension"):
        distcp.FileSystemWriter(tmp_path, _extensions=[object()])


def test_a_transformed_checkpoint_is_format_version_2_and_version_1_cannot_claim_it(
    tmp_path: Path,
) -> None:
    """A reader that predates transforms would take same-length transformed
    bytes for raw ones: such a checkpoint says version 2, which it refuses."""
    save_transformed(tmp_path / "t")
    distcp.save(state(), checkpoint_id=tmp_path / "plain", no_dist=True)
    header = (tmp_path / "t" / METADATA_FILE_NAME).read_bytes()[:24]
    assert int.from_bytes(header[8:12], "little") == 2
    plain = (tmp_path / "plain" / METADATA_FILE_NAME).read_bytes()[:24]
    assert int.from_bytes(plain[8:12], "little") == 1
    body = (tmp_path / "t" / METADATA_FILE_NAME).read_bytes()[24:]
    relabelled = fuzz_metadata.wrap(body, version=1)
    with pytest.raises(distcp.CheckpointFormatError, match="needs format version 2"):
        decode_metadata(relabelled, source="relabelled")
