"""Damaged checkpoints end in typed errors, never in silently wrong tensors, and
never run code from the files.

Data files: every bit of every item (tensor chunk or value) is covered by a crc32c
block checksum, so a flip anywhere in an item is a ``CorruptCheckpointError``
naming the file and the offset of the checksum block holding the flip; a flip in
alignment padding (covered by nothing) may load, and then loads bit-exact. Wrong
sizes (truncated, longer, missing files) are caught before any byte is read.

Metadata: any damage is a ``CheckpointFormatError`` (or the documented typed
error), and nothing in the directory is ever unpickled.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distcp
from distcp import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
    IncompleteCheckpointError,
    LoadItemType,
    LoadPlan,
    MetadataIndex,
    PickleNotAllowedError,
    ReadItem,
)
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.metadata import StorageInfo

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
SMALL_BLOCK = 64


# --- helpers


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def make_state() -> dict[str, Any]:
    """Several dtypes and shapes (odd byte lengths, so there is alignment padding
    between items) and non-tensor values of several kinds."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 7, generator=g),
        "h": torch.randn(50, generator=g).to(torch.bfloat16),
        "i": torch.randint(-1000, 1000, (5, 6), generator=g),
        "mask": torch.rand(21, generator=g) > 0.5,
        "c": torch.randn(9, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "f8": torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g).view(
            torch.float8_e4m3fn
        ),
        "step": 12345,
        "config": {"name": "run-" + "x" * 80, "betas": (0.9, 0.999), "layers": [1, 2, 3]},
        "rng": np.arange(10, dtype=np.uint8),
    }


def blank(state: dict[str, Any]) -> dict[str, Any]:
    """A load target with the same keys: zeroed tensors, ``None`` for values."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif isinstance(value, dict):
            out[key] = blank(value)
        else:
            out[key] = None
    return out


def assert_same(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        got = loaded[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape, key
            assert raw(got) == raw(value), f"{key} differs"
        elif isinstance(value, dict):
            assert_same(got, value)
        elif isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and np.array_equal(got, value), key
        else:
            assert type(got) is type(value) and got == value, key


def load_all(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    target = blank(state)
    distcp.load(target, checkpoint_id=path, no_dist=True)
    return target


def items_by_file(path: Path) -> dict[str, list[StorageInfo]]:
    """Every stored item, grouped by data file (from distcp's own reader)."""
    metadata = FileSystemReader(path).read_metadata()
    out: dict[str, list[StorageInfo]] = {}
    for info in metadata.storage_data.values():
        out.setdefault(info.relative_path, []).append(info)
    return out


def item_at(items: list[StorageInfo], position: int) -> StorageInfo | None:
    for info in items:
        if info.offset <= position < info.offset + info.length:
            return info
    return None


def block_start(info: StorageInfo, position: int) -> int:
    """File offset of the checksum block of ``info`` that holds ``position``."""
    block = info.checksum_block_size
    return info.offset + (position - info.offset) // block * block


@contextlib.contextmanager
def flipped(file: Path, position: int, bit: int) -> Iterator[None]:
    """Flip one bit of ``file`` for the duration of the block, then restore it."""
    original = file.read_bytes()
    damaged = bytearray(original)
    damaged[position] ^= 1 << bit
    file.write_bytes(bytes(damaged))
    try:
        yield
    finally:
        file.write_bytes(original)


@contextlib.contextmanager
def replaced(file: Path, content: bytes | None) -> Iterator[None]:
    """Replace ``file``'s content (``None``: delete it) for the duration of the block."""
    original = file.read_bytes()
    if content is None:
        file.unlink()
    else:
        file.write_bytes(content)
    try:
        yield
    finally:
        file.write_bytes(original)


class Malicious:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(Malicious(marker), protocol=pickle.HIGHEST_PROTOCOL)


# --- fixtures

STATE = make_state()


@pytest.fixture(scope="module", params=[None, SMALL_BLOCK], ids=["block-1MiB", "block-64"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed checkpoint of ``STATE`` over two data files (per-module; tests
    that damage it restore it)."""
    path = tmp_path_factory.mktemp("ckpt")
    options = {} if request.param is None else {"checksum_block_size": request.param}
    writer = FileSystemWriter(path, thread_count=2, sync_files=False, **options)
    distcp.save(STATE, storage_writer=writer, no_dist=True)
    return path


@pytest.fixture()
def copy(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the checkpoint, for tests that damage it for good."""
    target = tmp_path / "copy"
    shutil.copytree(checkpoint, target)
    return target


def test_fixture_checkpoint_has_what_the_tests_rely_on(checkpoint: Path) -> None:
    files = items_by_file(checkpoint)
    assert len(files) == 2
    infos = [info for items in files.values() for info in items]
    assert len(infos) == 12  # 7 tensors, 5 values
    padding = sum(
        (checkpoint / name).stat().st_size - sum(info.length for info in items)
        for name, items in files.items()
    )
    assert padding > 0
    assert_same(load_all(checkpoint, STATE), STATE)


# --- data files: bit flips


def expect_flip_caught(checkpoint: Path, name: str, position: int, bit: int) -> None:
    file = checkpoint / name
    info = item_at(items_by_file(checkpoint)[name], position)
    with flipped(file, position, bit):
        if info is None:  # alignment padding: no checksum covers it
            assert_same(load_all(checkpoint, STATE), STATE)
            return
        offset = block_start(info, position)
        with pytest.raises(
            CorruptCheckpointError,
            match=rf"checksum mismatch in .*{re.escape(name)} at byte offset {offset} ",
        ) as caught:
            load_all(checkpoint, STATE)
    assert caught.value.file == str(file)
    assert caught.value.offset == offset


def test_flip_in_every_item_is_caught_at_its_block(checkpoint: Path) -> None:
    """First, middle and last byte of every tensor chunk and every value."""
    checked = 0
    for name, items in items_by_file(checkpoint).items():
        for info in items:
            assert info.length > 0
            last = info.offset + info.length - 1
            for position in {info.offset, (info.offset + last) // 2, last}:
                expect_flip_caught(checkpoint, name, position, bit=position % 8)
            checked += 1
    assert checked == 12


def test_flips_in_alignment_padding_load_bit_exact(checkpoint: Path) -> None:
    flipped_bytes = 0
    originals = {}
    for name, items in items_by_file(checkpoint).items():
        file = checkpoint / name
        originals[file] = data = file.read_bytes()
        damaged = bytearray(data)
        for position in range(len(data)):
            if item_at(items, position) is None:
                damaged[position] ^= 0xFF
                flipped_bytes += 1
        file.write_bytes(bytes(damaged))
    try:
        assert flipped_bytes > 0
        assert_same(load_all(checkpoint, STATE), STATE)
    finally:
        for file, data in originals.items():
            file.write_bytes(data)


@SETTINGS
@given(data=st.data())
def test_flip_anywhere_in_a_data_file_is_caught_or_harmless(checkpoint: Path, data: Any) -> None:
    files = items_by_file(checkpoint)
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    size = (checkpoint / name).stat().st_size
    position = data.draw(st.integers(0, size - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    expect_flip_caught(checkpoint, name, position, bit)


# --- partial (resharding) reads


class RegionPlanner(DefaultLoadPlanner):
    """Reads one box of a saved 2-d chunk into ``dest``, as a resharding load
    that needs only part of a saved chunk does."""

    def __init__(self, key: str, rows: tuple[int, int], cols: tuple[int, int]) -> None:
        super().__init__()
        self.key, self.rows, self.cols = key, rows, cols
        self.dest = torch.zeros(rows[1] - rows[0], cols[1] - cols[0], dtype=STATE[key].dtype)

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex(self.key, (0, 0))
        item = ReadItem(
            type=LoadItemType.TENSOR,
            dest_index=index,
            dest_offsets=torch.Size([0, 0]),
            storage_index=index,
            storage_offsets=torch.Size([self.rows[0], self.cols[0]]),
            lengths=torch.Size(list(self.dest.shape)),
        )
        return LoadPlan([item])

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.dest


def load_region(
    path: Path, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[torch.Tensor, FileSystemReader]:
    reader = FileSystemReader(path)
    planner = RegionPlanner("w", rows, cols)
    distcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    return planner.dest, reader


@pytest.fixture(scope="module")
def small_block_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small-block")
    writer = FileSystemWriter(path, checksum_block_size=SMALL_BLOCK, sync_files=False)
    distcp.save(STATE, storage_writer=writer, no_dist=True)
    return path


def read_span(
    info: StorageInfo, rows: tuple[int, int], cols: tuple[int, int], row_bytes: int
) -> tuple[int, int]:
    """The bytes of the item a verifying reader reads for a region no other
    rank reads the rest of: the whole blocks from its first byte to its last
    (rows here are shorter than a block, so every block in between holds some)."""
    block = info.checksum_block_size
    first = rows[0] * row_bytes + cols[0] * 4
    last = (rows[1] - 1) * row_bytes + cols[1] * 4
    return first // block * block, min(-(-last // block) * block, info.length)


def test_partial_read_reads_and_verifies_whole_blocks(small_block_checkpoint: Path) -> None:
    info = (
        FileSystemReader(small_block_checkpoint)
        .read_metadata()
        .storage_data[MetadataIndex("w", (0, 0))]
    )
    row_bytes = 7 * 4
    dest, reader = load_region(small_block_checkpoint, (10, 13), (2, 5))
    assert raw(dest) == raw(STATE["w"][10:13, 2:5])
    start, end = read_span(info, (10, 13), (2, 5), row_bytes)
    assert (start, end) == (256, 384)  # the region spans bytes 288..356 of the chunk
    assert reader.report.bytes_needed == 3 * 3 * 4
    # A region no other rank reads the rest of: its blocks are read whole and
    # verified here, and every byte needed was verified.
    assert reader.report.bytes_read == end - start
    assert reader.report.bytes_verified == reader.report.bytes_needed
    assert reader.report.split_blocks == 0


@SETTINGS
@given(data=st.data())
def test_flips_in_the_blocks_a_partial_read_covers_are_caught(
    small_block_checkpoint: Path, data: Any
) -> None:
    path = small_block_checkpoint
    info = FileSystemReader(path).read_metadata().storage_data[MetadataIndex("w", (0, 0))]
    rows_total, cols_total = STATE["w"].shape
    r0 = data.draw(st.integers(0, rows_total - 1), label="first row")
    r1 = data.draw(st.integers(r0 + 1, rows_total), label="end row")
    c0 = data.draw(st.integers(0, cols_total - 1), label="first col")
    c1 = data.draw(st.integers(c0 + 1, cols_total), label="end col")
    start, end = read_span(info, (r0, r1), (c0, c1), cols_total * 4)
    # Mostly inside the blocks read, sometimes in the rest of the chunk.
    inside = data.draw(st.booleans(), label="inside the blocks read")
    if inside or (start == 0 and end == info.length):
        relative = data.draw(st.integers(start, end - 1), label="position")
    else:
        outside = [*range(0, start), *range(end, info.length)]
        relative = data.draw(st.sampled_from(outside), label="position")
    position = info.offset + relative
    bit = data.draw(st.integers(0, 7), label="bit")
    file = path / info.relative_path
    with flipped(file, position, bit):
        if start <= relative < end:
            offset = block_start(info, position)
            with pytest.raises(
                CorruptCheckpointError, match=rf"checksum mismatch in .* at byte offset {offset} "
            ) as caught:
                load_region(path, (r0, r1), (c0, c1))
            assert caught.value.file == str(file)
            assert caught.value.offset == offset
        else:  # a block the load does not need is not read, so it cannot matter
            dest, _ = load_region(path, (r0, r1), (c0, c1))
            assert raw(dest) == raw(STATE["w"][r0:r1, c0:c1])


# --- data files: wrong sizes


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_truncated_data_file_names_the_file(checkpoint: Path, data: Any) -> None:
    name = data.draw(st.sampled_from(sorted(items_by_file(checkpoint))), label="file")
    file = checkpoint / name
    size = file.stat().st_size
    length = data.draw(st.integers(0, size - 1), label="new length")
    with (
        replaced(file, file.read_bytes()[:length]),
        pytest.raises(
            CorruptCheckpointError,
            match=rf"data file .*{re.escape(name)} is {length} bytes but the metadata records "
            rf"{size} \(truncated or replaced",
        ) as caught,
    ):
        load_all(checkpoint, STATE)
    assert caught.value.file == str(file)
    assert caught.value.offset == length


def test_missing_data_file_names_the_file(copy: Path) -> None:
    for name in items_by_file(copy):
        file = copy / name
        with (
            replaced(file, None),
            pytest.raises(
                CorruptCheckpointError, match=rf"data file .*{re.escape(name)} is missing"
            ) as caught,
        ):
            load_all(copy, STATE)
        assert caught.value.file == str(file)


@pytest.mark.parametrize("extra", [1, 63, 4096])
def test_longer_data_file_names_the_file(copy: Path, extra: int) -> None:
    for name in items_by_file(copy):
        file = copy / name
        size = file.stat().st_size
        with (
            replaced(file, file.read_bytes() + b"\x00" * extra),
            pytest.raises(
                CorruptCheckpointError,
                match=rf"data file .*{re.escape(name)} is {size + extra} bytes but the metadata "
                rf"records {size}",
            ) as caught,
        ):
            load_all(copy, STATE)
        assert caught.value.file == str(file)
        assert caught.value.offset == size


def test_data_file_replaced_by_a_malicious_pickle_runs_nothing(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    files = items_by_file(copy)
    name = max(files, key=lambda n: (copy / n).stat().st_size)
    file = copy / name
    size = file.stat().st_size
    assert len(payload) < size
    # A different size is caught before reading; the same size by the checksums.
    different_size = pytest.raises(
        CorruptCheckpointError, match=rf"{re.escape(name)} is {len(payload)} bytes"
    )
    with replaced(file, payload), different_size:
        load_all(copy, STATE)
    same_size = payload + b"\x00" * (size - len(payload))
    with (
        replaced(file, same_size),
        pytest.raises(CorruptCheckpointError, match="checksum mismatch") as caught,
    ):
        load_all(copy, STATE)
    assert caught.value.file == str(file)
    starts = {
        info.offset + k * info.checksum_block_size
        for info in files[name]
        for k in range(len(info.checksums))
    }
    assert caught.value.offset in starts
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path: Path) -> None:
    """The payload the tests feed distcp really would run if unpickled."""
    marker = tmp_path / "pwned"
    pickle.loads(malicious_pickle(marker))
    assert marker.exists()


def test_pickled_value_needs_the_loaders_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt"
    planner = DefaultSavePlanner(allow_pickle=True)
    distcp.save({"evil": Malicious(marker)}, checkpoint_id=path, planner=planner, no_dist=True)
    with pytest.raises(PickleNotAllowedError, match=r"key 'evil'.*pickled .*Malicious"):
        distcp.load({"evil": None}, checkpoint_id=path, no_dist=True)
    assert not marker.exists()
    # With the opt-in it is unpickled: the control that shows the payload is live.
    target: dict[str, Any] = {"evil": None}
    distcp.load(
        target, checkpoint_id=path, planner=DefaultLoadPlanner(allow_pickle=True), no_dist=True
    )
    assert marker.exists()


# --- metadata file


def metadata_of(path: Path) -> Path:
    return path / METADATA_FILE_NAME


@settings(max_examples=50, deadline=None, derandomize=True)
@given(data=st.data())
def test_truncated_metadata_is_a_format_error(checkpoint: Path, data: Any) -> None:
    file = metadata_of(checkpoint)
    original = file.read_bytes()
    length = data.draw(st.integers(0, len(original) - 1), label="new length")
    pattern = (
        r"is not a distcp metadata file \(bad magic\)"
        if length < 24
        else rf": body is {length - 24} bytes, header says {len(original) - 24} \(truncated\?\)"
    )
    with replaced(file, original[:length]), pytest.raises(CheckpointFormatError, match=pattern):
        load_all(checkpoint, STATE)


def expected_header_error(position: int, original: bytes, bit: int) -> str:
    if position < 8:
        return r"is not a distcp metadata file \(bad magic\)"
    if position < 12:
        version = 1 ^ (1 << (bit + 8 * (position - 8)))
        return rf"has format version {version}; this distcp reads versions 1, 2\."
    if position < 16 or position >= 24:
        return r"metadata checksum mismatch \(corrupt metadata\)"
    (length,) = struct.unpack_from("<Q", original, 16)
    length ^= 1 << (bit + 8 * (position - 16))
    return rf"body is {len(original) - 24} bytes, header says {length}"


@SETTINGS
@given(data=st.data())
def test_bit_flipped_metadata_is_a_format_error(checkpoint: Path, data: Any) -> None:
    file = metadata_of(checkpoint)
    original = file.read_bytes()
    # Half the examples in the 24-byte header, half anywhere.
    in_header = data.draw(st.booleans(), label="in header")
    position = data.draw(st.integers(0, 23 if in_header else len(original) - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    with (
        flipped(file, position, bit),
        pytest.raises(CheckpointFormatError, match=expected_header_error(position, original, bit)),
    ):
        load_all(checkpoint, STATE)


def framed(payload: bytes, *, version: int = 1) -> bytes:
    """``payload`` behind a correct header, so only the body's decoding can object."""
    magic = b"\x89DCP\r\n\x1a\n"
    return struct.pack("<8sIIQ", magic, version, crc32c.crc32c(payload), len(payload)) + payload


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"bad magic"),
        (bytes(range(256)) * 8, r"bad magic"),
        (b"\x89DCP\r\n\x1a\n" + bytes(range(200)), r"format version"),
        (framed(bytes(range(256))), r"metadata body does not decode"),
        (framed(b"\xc1"), r"metadata body does not decode"),
        (framed(b"\x93\x01\x02\x03"), r"metadata body is not a map"),
        (framed(b"\x80"), r"metadata: missing field 'save_id'"),
        (framed(b"\x81\x01\x02"), r"metadata body does not decode"),  # int map key
    ],
    ids=["empty", "garbage", "magic-then-garbage", "framed-garbage", "framed-invalid-msgpack",
         "framed-array", "framed-empty-map", "framed-int-key"],
)  # fmt: skip
def test_garbage_metadata_is_a_format_error(copy: Path, content: bytes, pattern: str) -> None:
    metadata_of(copy).write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=pattern):
        load_all(copy, STATE)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_torch_dcp_metadata_is_refused_with_a_hint(copy: Path, tmp_path: Path) -> None:
    torch_dir = tmp_path / "torch-dcp"
    torch_dcp.save({"w": torch.ones(3)}, checkpoint_id=torch_dir, no_dist=True)
    metadata_of(copy).write_bytes((torch_dir / ".metadata").read_bytes())
    with pytest.raises(
        CheckpointFormatError, match=r"bad magic\)\. If it is a torch DCP checkpoint, load it with"
    ):
        load_all(copy, STATE)
    # The torch DCP directory itself loads (distcp.torch_dcp), nothing unpickled unsafely.
    state = {"w": torch.zeros(3)}
    distcp.load(state, checkpoint_id=torch_dir, no_dist=True)
    assert torch.equal(state["w"], torch.ones(3))


def test_malicious_pickle_as_metadata_runs_nothing(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    metadata_of(copy).write_bytes(payload)
    with pytest.raises(CheckpointFormatError, match=r"bad magic"):
        load_all(copy, STATE)
    # Behind a valid header, so the body decoder sees the pickle bytes.
    metadata_of(copy).write_bytes(framed(payload))
    with pytest.raises(CheckpointFormatError, match=r"does not decode|is not a map"):
        load_all(copy, STATE)
    # As a torch DCP '.metadata' next to missing distcp metadata.
    metadata_of(copy).unlink()
    (copy / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointFormatError, match=r"refused, never imported or run"):
        load_all(copy, STATE)
    assert not marker.exists()


# --- missing pieces


def test_data_files_without_metadata_are_an_incomplete_checkpoint(copy: Path) -> None:
    save_id = FileSystemReader(copy).read_metadata().storage_meta.save_id  # type: ignore[union-attr]
    metadata = metadata_of(copy).read_bytes()
    metadata_of(copy).unlink()
    assert any(name.startswith("data-") for name in os.listdir(copy))
    with pytest.raises(
        IncompleteCheckpointError,
        match=r"holds no committed checkpoint \(\.metadata\.distcp is missing\): a save into it "
        "did not finish",
    ):
        load_all(copy, STATE)
    # A crash between writing the temporary metadata and renaming it: still incomplete.
    (copy / f"{METADATA_FILE_NAME}.tmp-{save_id}").write_bytes(metadata)
    with pytest.raises(IncompleteCheckpointError, match="holds no committed checkpoint"):
        load_all(copy, STATE)


def test_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint at .*nowhere") as caught:
        load_all(missing, STATE)
    assert isinstance(caught.value, FileNotFoundError)
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"is not a checkpoint directory"):
        load_all(a_file, STATE)


def test_data_file_replaced_by_a_directory_of_the_same_size(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    size = probe.stat().st_size
    if size == 0:
        pytest.skip("directories report size 0 here, so the size check alone catches this")
    path = tmp_path / "ckpt"
    state = {"bytes": torch.arange(size, dtype=torch.int64).to(torch.uint8)}
    distcp.save(state, checkpoint_id=path, no_dist=True)
    (name,) = items_by_file(path)
    (path / name).unlink()
    probe.rename(path / name)  # an empty directory, exactly as big as the file was
    with pytest.raises(
        CorruptCheckpointError, match=rf"data file .*{re.escape(name)} is not a regular file"
    ) as caught:
        distcp.load(
            {"bytes": torch.zeros(size, dtype=torch.uint8)}, checkpoint_id=path, no_dist=True
        )
    assert caught.value.file == str(path / name)
