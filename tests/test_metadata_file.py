"""The metadata file (docs/format.md): round trips, validation of malicious or
invalid metadata before any data file is opened, and an independent decoder,
written from the spec with only struct/msgpack/crc32c, that reads real
checkpoints back bit-exact."""

from __future__ import annotations

import builtins
import contextlib
import copy as copy_module
import io
import itertools
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distcp
from distcp import (
    BytesStorageMetadata,
    CheckpointFormatError,
    ChunkStorageMetadata,
    FileSystemReader,
    FileSystemWriter,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from distcp.dtypes import supported_dtypes
from distcp.metadata import StorageInfo
from distcp.metadata_file import decode_metadata, encode_metadata

MAGIC = b"\x89DCP\r\n\x1a\n"
HEADER = struct.Struct("<8sIIQ")
METADATA = ".metadata.distcp"


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


# --- editing a real metadata file


def read_body(path: Path) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb((path / METADATA).read_bytes()[24:], raw=False)
    return body


def write_metadata(path: Path, body: Any, *, version: int = 1) -> None:
    """Encode ``body`` behind a header with a correct crc and length, so that
    only validation can object to it."""
    payload = msgpack.packb(body, use_bin_type=True)
    header = HEADER.pack(MAGIC, version, crc32c.crc32c(payload), len(payload))
    (path / METADATA).write_bytes(header + payload)


def entry(body: dict[str, Any], key: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in body["entries"] if e["key"] == key)
    return found


@contextlib.contextmanager
def recorded_opens() -> Iterator[list[str]]:
    """Record every path opened through ``os.open``/``open``/``io.open`` (what
    ``distcp.filesystem.reader`` and ``pathlib`` use)."""
    opened: list[str] = []
    real_os_open, real_io_open = os.open, io.open

    def os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fsdecode(path))
        return real_os_open(path, *args, **kwargs)

    def io_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(file, int):
            opened.append(os.fsdecode(file))
        return real_io_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "open", os_open)
        patch.setattr(io, "open", io_open)
        patch.setattr(builtins, "open", io_open)
        yield opened


STATE: dict[str, Any] = {
    "w": torch.arange(20, dtype=torch.float32).reshape(4, 5),
    "b": torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16),
    "e": torch.empty(0, 3),
    "step": 7,
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template")
    distcp.save(STATE, storage_writer=FileSystemWriter(path, sync_files=False), no_dist=True)
    return path


@pytest.fixture()
def ckpt(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ckpt"
    shutil.copytree(template, path)
    return path


def chunk_of(body: dict[str, Any], key: str) -> dict[str, Any]:
    chunk: dict[str, Any] = entry(body, key)["chunks"][0]
    return chunk


def split_w(body: dict[str, Any], rows_a: tuple[int, int], rows_b: tuple[int, int]) -> None:
    """Replace w's one chunk (4×5 float32) by two row blocks, each pointing at
    the bytes of its rows (so that ranges, lengths and checksum counts are
    valid and only the geometry can be wrong)."""
    whole = chunk_of(body, "w")
    chunks = []
    for first, end in (rows_a, rows_b):
        length = (end - first) * 5 * 4
        chunks.append(
            {
                "offsets": [first, 0],
                "sizes": [end - first, 5],
                "file": whole["file"],
                "offset": whole["offset"] + first * 5 * 4,
                "length": length,
                "crc32c": [0] * (1 if length else 0),
            }
        )
    entry(body, "w")["chunks"] = chunks


def file_of(body: dict[str, Any], key: str) -> dict[str, Any]:
    record: dict[str, Any] = body["files"][chunk_of(body, key)["file"]]
    return record


def set_path(*path: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets one field: ``set_path(step, ..., field, value)``, where
    the steps index into the body, ``"entry", key`` selects an entry by key and
    ``"chunk"`` an entry's first chunk."""
    *steps, field, value = path

    def edit(body: dict[str, Any]) -> None:
        node: Any = body
        walk = iter(steps)
        for step in walk:
            if step == "entry":
                node = entry(node, next(walk))
            elif step == "chunk":
                node = node["chunks"][0]
            else:
                node = node[step]
        node[field] = value

    return edit


def drop(field: str) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        del body[field]

    return edit


def edit_files(field: str, value: Any, index: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        body["files"][index][field] = value

    return edit


def _name_edit(make: Callable[[str], str]) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        record = body["files"][0]
        record["name"] = make(record["name"])

    return edit


def _range_past_end(body: dict[str, Any]) -> None:
    chunk = chunk_of(body, "w")
    chunk["offset"] = file_of(body, "w")["size"] - chunk["length"] + 1


def _file_smaller(body: dict[str, Any]) -> None:
    file_of(body, "w")["size"] = chunk_of(body, "w")["offset"] + 79


def _duplicate_file(body: dict[str, Any]) -> None:
    body["files"].append(dict(body["files"][0]))


def _duplicate_key(body: dict[str, Any]) -> None:
    body["entries"].append(copy_module.deepcopy(entry(body, "w")))


def _duplicate_empty_chunk(body: dict[str, Any]) -> None:
    chunks = entry(body, "e")["chunks"]
    chunks.append(dict(chunks[0]))


def _extra_checksum(body: dict[str, Any]) -> None:
    chunk_of(body, "w")["crc32c"].append(0)


def _drop_field(key: str, field: str) -> Callable[[dict[str, Any]], None]:
    def edit(body: dict[str, Any]) -> None:
        del entry(body, key)[field]

    return edit


def _planner_data_pickle(body: dict[str, Any]) -> None:
    payload = msgpack.packb(["builtins.open", b"\x80\x05N."], use_bin_type=True)
    body["planner_data"] = msgpack.packb(msgpack.ExtType(13, payload), use_bin_type=True)


# (id, edit of the decoded body, pattern the error message must match)
INVALID_BODIES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    # file names that leave the checkpoint directory
    ("name-slash", _name_edit(lambda n: "sub/" + n), r"files\[0\]: unsafe file name 'sub/"),
    ("name-dotdot", _name_edit(lambda n: "../" + n), r"unsafe file name '\.\./"),
    ("name-dotdot-only", _name_edit(lambda n: ".."), r"unsafe file name '\.\.'"),
    ("name-inner-dotdot", _name_edit(lambda n: "a..b"), r"unsafe file name 'a\.\.b'"),
    ("name-absolute", _name_edit(lambda n: "/etc/passwd"), r"unsafe file name '/etc/passwd'"),
    ("name-leading-dot", _name_edit(lambda n: ".metadata.distcp"), r"unsafe file name '\.meta"),
    ("name-empty", _name_edit(lambda n: ""), r"unsafe file name ''"),
    ("name-backslash", _name_edit(lambda n: "..\\x"), r"unsafe file name"),
    ("name-nul", _name_edit(lambda n: n + "\x00"), r"unsafe file name"),
    ("name-too-long", _name_edit(lambda n: "a" * 256), r"unsafe file name"),
    ("name-not-str", edit_files("name", b"data"), r"files\[0\]\.name: expected str"),
    ("file-duplicate", _duplicate_file, r"files\[\d\]: duplicate name or negative size"),
    ("file-negative-size", edit_files("size", -1), r"duplicate name or negative size"),
    # byte ranges
    ("range-past-end", _range_past_end, r"key 'w' chunk 0: byte range \[\d+, \d+\) lies outside "
     r"file 'data-[0-9a-f]{16}-00000-\d{3}\.distcp' of \d+ bytes"),
    ("file-size-too-small", _file_smaller, r"key 'w' chunk 0: byte range .* lies outside file"),
    ("negative-offset", set_path("entry", "w", "chunk", "offset", -1), r"byte range \[-1, 79\)"),
    ("file-index-out-of-range", set_path("entry", "w", "chunk", "file", 9),
     r"key 'w' chunk 0: file index 9 out of range"),
    # chunk geometry
    ("chunk-outside-shape", set_path("entry", "w", "chunk", "offsets", [1, 0]),
     r"key 'w' chunk 0: box \[1, 0\]\+\[4, 5\] lies outside shape \[4, 5\]"),
    ("chunk-wrong-rank", set_path("entry", "w", "chunk", "offsets", [0]),
     r"key 'w' chunk 0: offsets/sizes do not match the 2-d shape"),
    ("chunks-overlap", lambda b: split_w(b, (0, 3), (2, 4)), r"key 'w': chunks 0 and 1 overlap"),
    ("chunks-gap", lambda b: split_w(b, (0, 2), (3, 4)),
     r"key 'w': chunks do not cover the tensor's 20 elements"),
    ("no-chunks", set_path("entry", "w", "chunks", []), r"key 'w': chunks do not cover"),
    ("chunks-same-offsets", _duplicate_empty_chunk,
     r"key 'e' chunk 1: another chunk has the same offsets \[0, 0\]"),
    ("length-not-numel-x-itemsize", set_path("entry", "w", "chunk", "length", 76),
     r"key 'w' chunk 0: 76 bytes stored, but 20 × torch\.float32 needs 80"),
    ("dtype-wider-than-stored", set_path("entry", "w", "dtype", "float64"),
     r"80 bytes stored, but 20 × torch\.float64 needs 160"),
    ("dtype-unknown", set_path("entry", "w", "dtype", "float33"),
     r"key 'w': unknown dtype name 'float33'"),
    ("dtype-torch-attribute", set_path("entry", "w", "dtype", "Tensor"), r"unknown dtype name"),
    ("dtype-alias", set_path("entry", "w", "dtype", "float"), r"unknown dtype name 'float'"),
    # checksums
    ("checksum-extra", _extra_checksum,
     r"key 'w' chunk 0: expected 1 crc32c values \(80 bytes in blocks of 1048576\), got 2"),
    ("checksum-missing", set_path("entry", "w", "chunk", "crc32c", []), r"expected 1 crc32c"),
    ("checksum-value-too-big", set_path("entry", "w", "chunk", "crc32c", [1 << 32]),
     r"crc32c values must be 32-bit unsigned integers"),
    ("checksum-algorithm", set_path("checksum", "algorithm", "xxh3"),
     r"unknown checksum algorithm 'xxh3'"),
    ("checksum-block-zero", set_path("checksum", "block_size", 0),
     r"checksum block size must be positive, got 0"),
    ("checksum-block-str", set_path("checksum", "block_size", "1"),
     r"checksum\.block_size: expected int"),
    # entries
    ("entry-type-unknown", set_path("entry", "w", "type", "pickle"),
     r"key 'w': unknown entry type 'pickle'"),
    ("entry-duplicate-key", _duplicate_key, r"key 'w' appears twice"),
    ("entry-missing-dtype", _drop_field("w", "dtype"), r"key 'w': missing field 'dtype'"),
    ("entry-missing-chunks", _drop_field("w", "chunks"), r"key 'w': missing field 'chunks'"),
    ("value-missing-crc", _drop_field("step", "crc32c"), r"key 'step': missing field 'crc32c'"),
    # field types
    ("key-not-str", set_path("entries", 0, "key", 5), r"entries\[0\]\.key: expected str"),
    ("shape-str", set_path("entry", "w", "shape", "45"), r"key 'w'\.shape: expected list"),
    ("shape-float", set_path("entry", "w", "shape", [4.0, 5]),
     r"key 'w'\.shape: expected a list of integers"),
    ("shape-negative", set_path("entry", "w", "shape", [-4, 5]),
     r"key 'w'\.shape: values below 0"),
    ("offsets-bool", set_path("entry", "w", "chunk", "offsets", [False, 0]),
     r"key 'w' chunk 0\.offsets: expected a list of integers"),
    ("requires-grad-int", set_path("entry", "w", "requires_grad", 1),
     r"key 'w'\.requires_grad: expected bool"),
    ("file-index-bool", set_path("entry", "w", "chunk", "file", False),
     r"key 'w' chunk 0\.file: expected int"),
    ("length-str", set_path("entry", "w", "chunk", "length", "80"),
     r"key 'w' chunk 0\.length: expected int"),
    ("chunk-not-map", set_path("entry", "w", "chunks", [[0, 0]]),
     r"key 'w' chunk 0: missing field 'offsets'"),
    ("save-id-int", set_path("save_id", 5), r"metadata\.save_id: expected str"),
    ("world-size-zero", set_path("world_size", 0), r"world_size must be at least 1"),
    ("world-size-str", set_path("world_size", "2"), r"metadata\.world_size: expected int"),
    ("created-str", set_path("created", "today"), r"metadata\.created: expected int or float"),
    ("library-missing", drop("library"), r"metadata: missing field 'library'"),
    ("files-map", set_path("files", {}), r"metadata\.files: expected list"),
    ("entries-map", set_path("entries", {}), r"metadata\.entries: expected list"),
    ("checksum-missing-field", drop("checksum"), r"missing field 'checksum'"),
    ("shape-ext-type", set_path("entry", "w", "shape", msgpack.ExtType(4, b"\x92\x04\x05")),
     r"key 'w'\.shape: expected list"),
    ("planner-data-str", set_path("planner_data", "paths"), r"planner_data: expected bytes"),
    ("planner-data-garbage", set_path("planner_data", b"\xc1"),
     r"key 'planner_data': malformed value: not valid msgpack"),
    ("planner-data-pickle", _planner_data_pickle,
     r"key 'planner_data': the checkpoint holds a pickled builtins\.open"),
    ("storage-meta-str", set_path("storage_meta", "x"), r"storage_meta: expected a map"),
    ("storage-meta-modules", set_path("storage_meta", "modules", [1]),
     r"storage_meta: bad field types"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "pattern"), [case[1:] for case in INVALID_BODIES], ids=[c[0] for c in INVALID_BODIES]
)
def test_invalid_metadata_is_refused_before_any_data_file_is_opened(
    ckpt: Path, edit: Callable[[dict[str, Any]], None], pattern: str
) -> None:
    body = read_body(ckpt)
    edit(body)
    write_metadata(ckpt, body)
    metadata_path = str(ckpt / METADATA)
    with (
        recorded_opens() as opened,
        pytest.raises(CheckpointFormatError, match=rf"^{re.escape(metadata_path)}: .*{pattern}"),
    ):
        FileSystemReader(ckpt).read_metadata()
    assert metadata_path in opened  # the recorder sees the reader's opens
    assert not [p for p in opened if Path(p).name.startswith("data-")]
    # The same through load(): refused, and no data file is opened either.
    with recorded_opens() as opened, pytest.raises(CheckpointFormatError):
        distcp.load({"w": torch.zeros(4, 5)}, checkpoint_id=ckpt, no_dist=True)
    assert not [p for p in opened if Path(p).name.startswith("data-")]


def test_unedited_reencoded_metadata_loads(ckpt: Path) -> None:
    """The control for the cases above: re-encoding with no edit (and the valid
    two-chunk split) is accepted, so each refusal is the edit's doing."""
    body = read_body(ckpt)
    split_w(body, (0, 1), (1, 4))
    whole = read_body(ckpt)
    data = (ckpt / whole["files"][chunk_of(whole, "w")["file"]]["name"]).read_bytes()
    for chunk in entry(body, "w")["chunks"]:
        chunk["crc32c"] = [crc32c.crc32c(data[chunk["offset"] : chunk["offset"] + chunk["length"]])]
    write_metadata(ckpt, body)
    target = {"w": torch.zeros(4, 5), "b": torch.zeros(3, dtype=torch.bfloat16)}
    target |= {"e": torch.empty(0, 3), "step": None}
    with recorded_opens() as opened:
        distcp.load(target, checkpoint_id=ckpt, no_dist=True)
    assert [p for p in opened if Path(p).name.startswith("data-")]
    assert torch.equal(target["w"], STATE["w"]) and target["step"] == 7
    assert len(FileSystemReader(ckpt).read_metadata().state_dict_metadata["w"].chunks) == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("version", [0, 3, 0xFFFFFFFF])
def test_unknown_version_in_header_is_refused(ckpt: Path, version: int) -> None:
    write_metadata(ckpt, read_body(ckpt), version=version)
    with (
        recorded_opens() as opened,
        pytest.raises(
            CheckpointFormatError,
            match=rf"has format version {version}; this distcp reads versions 1, 2\. Upgrade",
        ),
    ):
        FileSystemReader(ckpt).read_metadata()
    assert not [p for p in opened if Path(p).name.startswith("data-")]


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda m: m + b"\x00", r"body is \d+ bytes, header says \d+ \(truncated\?\)"),
        (lambda m: m[:12] + bytes(4) + m[16:], r"metadata checksum mismatch"),
        (lambda m: b"\x89DCQ" + m[4:], r"bad magic"),
    ],
    ids=["trailing-byte", "zero-crc", "magic"],
)
def test_damaged_header_is_refused(
    ckpt: Path, damage: Callable[[bytes], bytes], pattern: str
) -> None:
    file = ckpt / METADATA
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CheckpointFormatError, match=pattern):
        FileSystemReader(ckpt).read_metadata()


# --- encode/decode round trip


def grid_metadata(
    shape: tuple[int, ...], cuts: list[list[int]], dtype: torch.dtype, block: int, files: int
) -> Metadata:
    """A tensor ``t`` tiled by the grid ``cuts`` (per dim, the chunk boundaries),
    its chunks laid out in ``files`` files at 64-aligned offsets, plus values."""
    bounds = [[0, *c, s] for c, s in zip(cuts, shape, strict=True)]
    chunks, storage = [], {}
    positions = [0] * files
    per_dim = [list(itertools.pairwise(b)) for b in bounds]
    for n, box in enumerate(itertools.product(*per_dim)):
        offsets = [lo for lo, _ in box]
        sizes = [hi - lo for lo, hi in box]
        length = math.prod(sizes) * dtype.itemsize
        file = n % files
        position = -(-positions[file] // 64) * 64
        positions[file] = position + length
        checksums = tuple(range(n, n + -(-length // block)))
        chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        storage[MetadataIndex("t", offsets)] = StorageInfo(
            f"data-00000000000000ab-00000-{file:03d}.distcp", position, length, checksums, block
        )
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {
        "t": TensorStorageMetadata(
            TensorProperties(dtype=dtype, requires_grad=True), torch.Size(shape), chunks
        ),
        "step": BytesStorageMetadata(),
    }
    storage[MetadataIndex("step")] = StorageInfo(
        "data-00000000000000ab-00001-000.distcp", 0, 3, (0xFFFFFFFF,) if block >= 3 else (1,) * 3,
        block,
    )  # fmt: skip
    return Metadata(
        state_dict_metadata=state,
        planner_data={"t": ["model", "t"], "step": ["step"], "opt.0": ["opt", 0]},
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=Path("/ckpt/step-1"), modules=["model", "opt"]),
    )


def assert_round_trips(metadata: Metadata) -> None:
    data = encode_metadata(metadata, save_id="00000000000000ab", world_size=2)
    decoded, sizes = decode_metadata(data, source="mem")
    assert decoded.state_dict_metadata == metadata.state_dict_metadata
    assert decoded.storage_data == metadata.storage_data
    assert decoded.planner_data == metadata.planner_data
    assert decoded.storage_meta == StorageMeta(
        checkpoint_id="/ckpt/step-1", save_id="00000000000000ab", modules=["model", "opt"]
    )
    assert decoded.version == "1"
    expected_sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        expected_sizes[info.relative_path] = max(expected_sizes.get(info.relative_path, 0), end)
    assert sizes == expected_sizes
    body = msgpack.unpackb(data[24:], raw=False)
    assert body["world_size"] == 2 and body["library"] == f"distcp {distcp.__version__}"


def test_round_trip_of_tensor_and_value_entries() -> None:
    metadata = grid_metadata((4, 6), [[2], [3]], torch.bfloat16, 8, files=2)
    assert len(metadata.state_dict_metadata["t"].chunks) == 4  # type: ignore[union-attr]
    assert_round_trips(metadata)


def test_round_trip_without_planner_data_or_storage_meta() -> None:
    metadata = Metadata(state_dict_metadata={}, storage_data={})
    data = encode_metadata(metadata, save_id="00000000000000ab", world_size=1)
    decoded, sizes = decode_metadata(data, source="mem")
    assert decoded.state_dict_metadata == {} and sizes == {}
    assert decoded.planner_data is None
    assert decoded.storage_meta == StorageMeta(save_id="00000000000000ab")


@st.composite
def grids(draw: st.DrawFn) -> tuple[tuple[int, ...], list[list[int]]]:
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    cuts = [sorted(set(draw(st.lists(st.integers(1, s - 1), max_size=2)))) if s > 1 else []
            for s in shape]  # fmt: skip
    return shape, cuts


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    grid=grids(),
    dtype=st.sampled_from(supported_dtypes()),
    block=st.sampled_from([1, 3, 64, 1 << 20]),
    files=st.integers(1, 3),
)
def test_round_trip_property(
    grid: tuple[tuple[int, ...], list[list[int]]], dtype: torch.dtype, block: int, files: int
) -> None:
    assert_round_trips(grid_metadata(*grid, dtype, block, files))


# --- an independent decoder, written from docs/format.md alone

SPEC_ITEMSIZE = {
    "bool": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8,
    "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "complex32": 4, "complex64": 8, "complex128": 16,
}  # fmt: skip
SPEC_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


class SpecError(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


def spec_read(directory: Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, Any]]:
    """Read a checkpoint following docs/format.md: returns each tensor as
    ``(dtype name, shape, row-major bytes)`` and each value decoded (the value
    types used below: msgpack natives and tuples, extension 4)."""
    data = (directory / METADATA).read_bytes()
    check(len(data) >= 24, "short header")
    magic, version, crc, length = struct.unpack("<8sIIQ", data[:24])
    check(magic == b"\x89DCP\r\n\x1a\n" and version == 1, "magic/version")
    body_bytes = data[24:]
    check(len(body_bytes) == length and crc32c.crc32c(body_bytes) == crc, "body")
    body = msgpack.unpackb(body_bytes, raw=False)
    check(body["checksum"]["algorithm"] == "crc32c", "algorithm")
    block = body["checksum"]["block_size"]
    files = []
    for record in body["files"]:
        name, size = record["name"], record["size"]
        check(bool(SPEC_SAFE_NAME.fullmatch(name)) and ".." not in name, f"name {name}")
        check((directory / name).stat().st_size == size, f"size of {name}")
        files.append((name, size))

    def read_item(record: dict[str, Any]) -> bytes:
        name, size = files[record["file"]]
        offset, length = record["offset"], record["length"]
        check(offset + length <= size, "range")
        with (directory / name).open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        check(len(data) == length, "short read")
        sums = [crc32c.crc32c(data[i : i + block]) for i in range(0, length, block)]
        check(sums == record["crc32c"], f"checksums of {name} at {offset}")
        return data

    def ext_hook(code: int, payload: bytes) -> Any:
        check(code == 4, f"extension {code} not needed here")
        return tuple(msgpack.unpackb(payload, raw=False, ext_hook=ext_hook))

    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    values: dict[str, Any] = {}
    for record in body["entries"]:
        key = record["key"]
        if record["type"] == "value":
            values[key] = msgpack.unpackb(
                read_item(record), raw=False, strict_map_key=False, ext_hook=ext_hook
            )
            continue
        check(record["type"] == "tensor", "type")
        itemsize, shape = SPEC_ITEMSIZE[record["dtype"]], record["shape"]
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        out = bytearray(math.prod(shape) * itemsize)
        covered = 0
        for chunk in record["chunks"]:
            offsets, sizes = chunk["offsets"], chunk["sizes"]
            data = read_item(chunk)
            check(len(data) == math.prod(sizes) * itemsize, "length")
            covered += math.prod(sizes)
            if not shape:
                out[:] = data
                continue
            run = sizes[-1] * itemsize  # one row of the chunk: contiguous in the tensor too
            rows = itertools.product(*(range(s) for s in sizes[:-1]))
            for n, row in enumerate(rows if run else ()):
                index = [o + i for o, i in zip(offsets, (*row, 0), strict=True)]
                start = sum(i * s for i, s in zip(index, strides, strict=True)) * itemsize
                out[start : start + run] = data[n * run : (n + 1) * run]
        check(covered == math.prod(shape), "tiling")
        tensors[key] = (record["dtype"], shape, bytes(out))
    values["<planner_data>"] = msgpack.unpackb(body["planner_data"], raw=False, ext_hook=ext_hook)
    return tensors, values


SPEC_NAMES = {getattr(torch, name): name for name in SPEC_ITEMSIZE}


def spec_tensor_state() -> dict[str, Any]:
    """One tensor of every dtype the spec names, in several shapes, plus values."""
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]
    state: dict[str, Any] = {}
    for n, (name, itemsize) in enumerate(SPEC_ITEMSIZE.items()):
        shape = shapes[n % len(shapes)]
        numel = math.prod(shape)
        high = 2 if name == "bool" else 256
        data = torch.randint(0, high, (numel * itemsize,), dtype=torch.uint8, generator=g)
        state[f"t_{name}"] = data.view(getattr(torch, name)).reshape(shape)
    state["layers"] = {"0": {"weight": torch.randn(6, 4, generator=g).t()}}  # non-contiguous
    state["step"] = 1000
    state["config"] = {"lr": 0.25, "name": "run", "betas": (0.9, 0.999), "ids": [1, -2]}
    return state


def assert_spec_reads(path: Path, state: dict[str, Any]) -> None:
    tensors, values = spec_read(path)
    flat_keys = {
        "layers.0.weight": state["layers"]["0"]["weight"],
        **{k: v for k, v in state.items() if isinstance(v, torch.Tensor)},
    }
    assert set(tensors) == set(flat_keys)
    for key, tensor in flat_keys.items():
        name, shape, data = tensors[key]
        assert name == SPEC_NAMES[tensor.dtype]
        assert shape == list(tensor.shape)
        assert data == raw(tensor), key
    assert values["step"] == 1000
    assert values["config.lr"] == 0.25 and values["config.name"] == "run"
    assert values["config.betas"] == (0.9, 0.999) and values["config.ids"] == [1, -2]
    assert values["<planner_data>"]["layers.0.weight"] == ["layers", "0", "weight"]
    assert values["<planner_data>"]["config.betas"] == ["config", "betas"]


@pytest.mark.parametrize("block", [16, 1 << 20])
def test_independent_decoder_reads_a_real_checkpoint(tmp_path: Path, block: int) -> None:
    state = spec_tensor_state()
    writer = FileSystemWriter(tmp_path, checksum_block_size=block, sync_files=False)
    distcp.save(state, storage_writer=writer, no_dist=True)
    assert_spec_reads(tmp_path, state)


def test_independent_decoder_catches_a_flipped_bit(tmp_path: Path) -> None:
    """The control: the decoder above does verify what it reads."""
    state = spec_tensor_state()
    distcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    body = read_body(tmp_path)
    chunk = chunk_of(body, "t_float32")
    file = tmp_path / body["files"][chunk["file"]]["name"]
    data = bytearray(file.read_bytes())
    data[chunk["offset"]] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="checksums of"):
        spec_read(tmp_path)


# Multi-chunk tensors need several ranks (one process saves one chunk per tensor).

SHARDED_SHAPE = (7, 5)


def sharded_full(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(math.prod(SHARDED_SHAPE)).reshape(SHARDED_SHAPE).to(dtype) * 3 - 20


def save_sharded(rank: int, world_size: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))

    def shard(tensor: torch.Tensor, placement: Any) -> Any:
        return distribute_tensor(tensor, mesh, [placement], src_data_rank=None)

    state = {
        "rows": shard(sharded_full(torch.float32), Shard(0)),
        "cols": shard(sharded_full(torch.int16), Shard(1)),
        "replicated": shard(sharded_full(torch.bfloat16), Replicate()),
        "plain": sharded_full(torch.float64),
        "step": 3,
    }
    writer = FileSystemWriter(path, checksum_block_size=16, sync_files=False)
    distcp.save(state, storage_writer=writer)


def test_independent_decoder_reassembles_sharded_tensors(
    rank_pool: Callable[[int], Any], tmp_path: Path
) -> None:
    rank_pool(2).run(save_sharded, str(tmp_path))
    body = read_body(tmp_path)
    assert len(entry(body, "rows")["chunks"]) == 2 and len(entry(body, "cols")["chunks"]) == 2
    assert body["world_size"] == 2
    tensors, values = spec_read(tmp_path)
    for key, dtype in [
        ("rows", torch.float32),
        ("cols", torch.int16),
        ("replicated", torch.bfloat16),
        ("plain", torch.float64),
    ]:
        name, shape, data = tensors[key]
        assert (name, shape) == (SPEC_NAMES[dtype], list(SHARDED_SHAPE))
        assert data == raw(sharded_full(dtype)), key
    assert values["step"] == 3
