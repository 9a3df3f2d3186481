"""The conformance suite every byte store passes (like zarr's ``StoreTests``).

Subclass :class:`StoreTests` in a test module, give it a ``checkpoint_url``
fixture (a fresh location per test: a directory, ``memory://…``,
``s3://bucket/prefix``) and, if the store needs them, ``storage_options``;
pytest then runs every test here against that store::

    class TestMyStore(StoreTests):
        @pytest.fixture
        def checkpoint_url(self, tmp_path):
            return f"myproto://{tmp_path.name}"

Multi-rank tests use the ``rank_pool`` fixture (``rank_pool(n)`` returns a
:class:`~distcp.testing.RankPool` of n gloo ranks; distcp's ``tests/conftest.py``
has one). A store whose objects one process cannot share with another
(``memory://``) sets ``shared_between_processes = False``, and those tests
skip, saying so. ``use_fsspec = True`` drives the store through
:class:`distcp.FsspecWriter`/:class:`distcp.FsspecReader` even for a local path.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

import distcp
from distcp.dtypes import supported_dtypes
from distcp.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CommitWarning,
    CorruptCheckpointError,
    DistributedCheckpointError,
    IncompleteCheckpointError,
)
from distcp.filesystem.layout import METADATA_FILE_NAME, PROBE_FILE_NAME, is_data_file_name
from distcp.stores import ByteStore, store_for

__all__ = ["StoreTests"]

Options = dict[str, Any]


# --- helpers, module-level so that spawned ranks can import them -------------


def make_store(url: str, options: Options, use_fsspec: bool) -> ByteStore:
    return store_for(url, options or None, use_fsspec=use_fsspec)


def writer_for(url: str, options: Options, use_fsspec: bool, **kwargs: Any) -> Any:
    if use_fsspec:
        return distcp.FsspecWriter(url, **kwargs, **options)
    return distcp.FileSystemWriter(url, storage_options=options or None, **kwargs)


def reader_for(url: str, options: Options, use_fsspec: bool, **kwargs: Any) -> Any:
    if use_fsspec:
        return distcp.FsspecReader(url, **kwargs, **options)
    return distcp.FileSystemReader(url, storage_options=options or None, **kwargs)


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaN payloads and all)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(
        0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=generator
    )
    if dtype == torch.bool:
        data &= 1
    return data.view(dtype).reshape(shape)


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def value_matrix() -> dict[str, Any]:
    """A state of every supported dtype (and shapes: 0-d, empty,
    non-contiguous) and every kind of safe value."""
    state: dict[str, Any] = {}
    for number, dtype in enumerate(supported_dtypes()):
        state[f"t.{str(dtype).removeprefix('torch.')}"] = random_bits((37, 3), dtype, number)
    state["shape.scalar"] = torch.tensor(3.5)
    state["shape.empty"] = torch.empty(0, 4)
    state["shape.strided"] = torch.arange(60.0).view(6, 10)[:, ::3]
    state["values"] = {
        "int": 7,
        "big": 1 << 70,
        "float": -0.0,
        "str": "ünïcode",
        "bytes": b"\x00\xff",
        "none": None,
        "tuple": (1, (2, "x")),
        "list": [1.5, [None]],
        "int_keys": {1: "a", 2: "b"},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
    }
    state["bytes_io"] = io.BytesIO(b"opaque payload")
    return state


def empty_like_state(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            with warnings.catch_warnings():  # "ComplexHalf support is experimental"
                warnings.simplefilter("ignore", UserWarning)
                out[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif isinstance(value, io.BytesIO):
            out[key] = io.BytesIO()
        else:
            out[key] = {name: None for name in value}
    return out


def assert_state_equal(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype, key
            assert raw(loaded[key]) == raw(value), key
        elif isinstance(value, io.BytesIO):
            assert loaded[key].getvalue() == value.getvalue(), key
        else:
            for name, expected in value.items():
                got = loaded[key][name]
                assert type(got) is type(expected), (key, name, type(got))
                if isinstance(expected, np.ndarray):
                    assert np.array_equal(got, expected) and got.dtype == expected.dtype
                elif isinstance(expected, float):
                    assert math.copysign(1, got) == math.copysign(1, expected) and got == expected
                else:
                    assert got == expected, (key, name)


def data_objects(store: ByteStore) -> set[str]:
    return {name for name in store.list() if is_data_file_name(name)}


def _mesh(world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def _sharded(full: torch.Tensor, world_size: int, dim: int) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(full, _mesh(world_size), [Shard(dim)])


def save_sharded_rows(
    rank: int, world_size: int, url: str, options: Options, use_fsspec: bool, seed: int
) -> None:
    """Every rank saves its rows of one tensor (Shard(0)) and a replicated one."""
    full = random_bits((64, 48), torch.float32, seed)
    state = {"w": _sharded(full, world_size, 0), "b": random_bits((5,), torch.int64, seed)}
    distcp.save(state, storage_writer=writer_for(url, options, use_fsspec))


def load_resharded(
    rank: int, world_size: int, url: str, options: Options, use_fsspec: bool, seed: int, dim: int
) -> dict[str, int]:
    """Load the tensor sharded along ``dim`` over this world; check every
    byte; return what this rank needed and transferred."""
    full = random_bits((64, 48), torch.float32, seed)
    target = _sharded(torch.zeros_like(full), world_size, dim)
    state = {"w": target, "b": torch.zeros(5, dtype=torch.int64)}
    reader = reader_for(url, options, use_fsspec)
    distcp.load(state, storage_reader=reader)
    expected = full.chunk(world_size, dim)[rank]
    assert raw(state["w"].to_local()) == raw(expected), f"rank {rank}: wrong shard"
    assert raw(state["b"]) == raw(random_bits((5,), torch.int64, seed))
    report = reader.report
    return {
        "needed": report.bytes_needed,
        "transferred": report.bytes_fetched or report.bytes_read,
        "verified": report.bytes_verified,
    }


def save_with_failing_rank(
    rank: int, world_size: int, url: str, options: Options, use_fsspec: bool, seed: int
) -> str:
    """A save in which the last rank's data object fails after its first
    write; returns the error every rank raised."""
    full = random_bits((64, 48), torch.float32, seed)
    state = {"w": _sharded(full, world_size, 0), "b": random_bits((5,), torch.int64, seed)}
    writer = writer_for(url, options, use_fsspec)
    if rank == world_size - 1:
        _fail_sinks(writer.store)
    try:
        distcp.save(state, storage_writer=writer)
    except DistributedCheckpointError as error:
        return str(error)
    raise AssertionError(f"rank {rank}: the save did not fail")


def _fail_sinks(store: ByteStore) -> None:
    create = store.create

    def failing(name: str, *, sync: bool) -> Any:
        sink = create(name, sync=sync)
        real_write = sink.write

        def write(data: memoryview | bytes) -> None:
            real_write(data)
            raise OSError(28, "No space left on device (injected)")

        sink.write = write  # type: ignore[method-assign]
        return sink

    store.create = failing  # type: ignore[method-assign]


def barrier(rank: int, world_size: int) -> None:
    dist.barrier()


# --- the suite ---------------------------------------------------------------


class StoreTests:
    """Every test a byte store must pass; see the module docstring."""

    shared_between_processes: bool = True
    use_fsspec: bool = False

    @pytest.fixture
    def checkpoint_url(self) -> str:
        raise NotImplementedError("a StoreTests subclass defines the checkpoint_url fixture")

    @pytest.fixture
    def storage_options(self) -> Options:
        return {}

    # helpers

    def store(self, url: str, options: Options) -> ByteStore:
        return make_store(url, options, self.use_fsspec)

    def writer(self, url: str, options: Options, **kwargs: Any) -> Any:
        return writer_for(url, options, self.use_fsspec, **kwargs)

    def reader(self, url: str, options: Options, **kwargs: Any) -> Any:
        return reader_for(url, options, self.use_fsspec, **kwargs)

    def save(self, state: dict[str, Any], url: str, options: Options, **kwargs: Any) -> None:
        distcp.save(state, storage_writer=self.writer(url, options, **kwargs), no_dist=True)

    def load(self, state: dict[str, Any], url: str, options: Options) -> Any:
        reader = self.reader(url, options)
        distcp.load(state, storage_reader=reader, no_dist=True)
        return reader

    def ranks(self, rank_pool: Callable[[int], Any], world_size: int) -> Any:
        if not self.shared_between_processes:
            pytest.skip(f"{type(self).__name__}: each process has its own objects")
        return rank_pool(world_size)

    def first_chunk(self, url: str, options: Options, key: str) -> tuple[str, int, int]:
        """``(object, offset, length)`` of the first stored chunk of ``key``."""
        metadata = self.reader(url, options).read_metadata()
        for index, info in metadata.storage_data.items():
            if index.fqn == key:
                return info.relative_path, info.offset, info.length
        raise AssertionError(f"{key} not stored")

    def rewrite(self, url: str, options: Options, name: str, data: bytes) -> None:
        store = self.store(url, options)
        store.delete(name)
        sink = store.create(name, sync=True)
        sink.write(data)
        sink.close()

    # round trips

    def test_round_trip_every_dtype_and_value(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        state = value_matrix()
        self.save(state, checkpoint_url, storage_options)
        loaded = empty_like_state(state)
        reader = self.load(loaded, checkpoint_url, storage_options)
        assert_state_equal(loaded, state)
        assert reader.report.bytes_verified == reader.report.bytes_read > 0

    def test_a_partial_load_transfers_only_what_it_needs(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        big = random_bits((1024, 1024), torch.float32, 1)  # 4 MiB
        small = random_bits((256,), torch.float64, 2)
        self.save({"big": big, "small": small}, checkpoint_url, storage_options)
        out = {"small": torch.zeros(256, dtype=torch.float64)}
        reader = self.load(out, checkpoint_url, storage_options)
        assert raw(out["small"]) == raw(small)
        transferred = reader.report.bytes_fetched or reader.report.bytes_read
        assert small.nbytes <= transferred <= small.nbytes + 4096

    # commit

    def test_commit_replaces_and_removes_superseded_objects(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        first = {"w": random_bits((300, 7), torch.float32, 3)}
        second = {"w": random_bits((300, 7), torch.float32, 4)}
        self.save(first, checkpoint_url, storage_options)
        store = self.store(checkpoint_url, storage_options)
        before = data_objects(store)
        self.save(second, checkpoint_url, storage_options)
        after = data_objects(store)
        assert before and after and not before & after, (before, after)
        names = set(store.list())
        assert METADATA_FILE_NAME in names and PROBE_FILE_NAME in names
        out = {"w": torch.zeros(300, 7)}
        self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(second["w"])

    def test_overwrite_false_refuses_and_keeps_the_checkpoint(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        first = {"w": random_bits((50, 3), torch.float32, 5)}
        self.save(first, checkpoint_url, storage_options)
        store = self.store(checkpoint_url, storage_options)
        objects = set(store.list())
        with pytest.raises(CheckpointExistsError, match="overwrite=False"):
            self.save({"w": torch.zeros(50, 3)}, checkpoint_url, storage_options, overwrite=False)
        assert set(store.list()) == objects
        out = {"w": torch.zeros(50, 3)}
        self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(first["w"])

    def test_overwrite_false_loses_a_race_at_the_commit(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        """Another saver commits between this save's set-up and its commit:
        the commit refuses (atomically where the store has a conditional
        create), the other checkpoint stands and this save's objects go."""
        other = {"w": random_bits((20, 3), torch.float32, 6)}
        writer = self.writer(checkpoint_url, storage_options, overwrite=False)
        publish = writer.store.publish
        raced: list[str] = []

        def racing_publish(name: str, data: bytes, **kwargs: Any) -> Any:
            if name == METADATA_FILE_NAME and not raced:
                raced.append(name)
                self.save(other, checkpoint_url, storage_options)
            return publish(name, data, **kwargs)

        writer.store.publish = racing_publish
        with pytest.raises(CheckpointExistsError):
            distcp.save({"w": torch.ones(20, 3)}, storage_writer=writer, no_dist=True)
        out = {"w": torch.zeros(20, 3)}
        reader = self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(other["w"])
        referenced = {info.relative_path for info in reader.metadata.storage_data.values()}
        assert data_objects(self.store(checkpoint_url, storage_options)) == referenced

    def test_a_failed_write_leaves_the_previous_checkpoint(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        first = {"w": random_bits((400, 300), torch.float32, 7)}
        self.save(first, checkpoint_url, storage_options)
        store = self.store(checkpoint_url, storage_options)
        objects = set(store.list())
        writer = self.writer(checkpoint_url, storage_options)
        _fail_sinks(writer.store)
        with pytest.raises(DistributedCheckpointError, match="injected"):
            distcp.save({"w": torch.ones(400, 300)}, storage_writer=writer, no_dist=True)
        assert set(store.list()) == objects  # nothing of the failed save is left
        out = {"w": torch.zeros(400, 300)}
        self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(first["w"])

    def test_cleanup_failure_after_the_commit_is_a_warning(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        self.save({"w": torch.zeros(10)}, checkpoint_url, storage_options)
        writer = self.writer(checkpoint_url, storage_options)

        def refuse(name: str) -> None:
            raise PermissionError(13, "delete denied (injected)")

        writer.store.delete = refuse
        new = {"w": random_bits((10,), torch.float32, 8)}
        with pytest.warns(CommitWarning, match="delete denied"):
            distcp.save(new, storage_writer=writer, no_dist=True)
        out = {"w": torch.zeros(10)}
        self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(new["w"])

    def test_a_failure_after_the_commit_point_reports_committed(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        writer = self.writer(checkpoint_url, storage_options)
        publish = writer.store.publish

        def failing_probe(name: str, data: bytes, **kwargs: Any) -> Any:
            if name == PROBE_FILE_NAME:
                raise OSError(5, "I/O error (injected)")
            return publish(name, data, **kwargs)

        writer.store.publish = failing_probe
        new = {"w": random_bits((10,), torch.float32, 9)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distcp.save(new, storage_writer=writer, no_dist=True)
        assert any(issubclass(w.category, CommitWarning) for w in caught)
        out = {"w": torch.zeros(10)}
        self.load(out, checkpoint_url, storage_options)
        assert raw(out["w"]) == raw(new["w"])

    # damage

    def test_a_flipped_byte_is_named_by_object_and_offset(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        state = {"w": random_bits((512, 1024), torch.float32, 10)}  # 2 MiB: two blocks
        self.save(state, checkpoint_url, storage_options)
        name, offset, length = self.first_chunk(checkpoint_url, storage_options, "w")
        store = self.store(checkpoint_url, storage_options)
        data = bytearray(store.read_whole(name, "data object"))
        flipped = offset + length - 10  # in the chunk's last block
        data[flipped] ^= 0x40
        self.rewrite(checkpoint_url, storage_options, name, bytes(data))
        block = distcp.knobs.CHECKSUM_BLOCK_SIZE
        with pytest.raises(CorruptCheckpointError) as caught:
            self.load({"w": torch.zeros(512, 1024)}, checkpoint_url, storage_options)
        assert caught.value.file == store.describe(name)
        assert caught.value.offset == offset + (length - 10) // block * block
        assert name in str(caught.value)

    def test_a_truncated_object_is_named(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        self.save({"w": random_bits((300, 10), torch.float32, 11)}, checkpoint_url, storage_options)
        name, offset, length = self.first_chunk(checkpoint_url, storage_options, "w")
        store = self.store(checkpoint_url, storage_options)
        data = store.read_whole(name, "data object")
        self.rewrite(checkpoint_url, storage_options, name, data[: offset + length // 2])
        with pytest.raises(CorruptCheckpointError) as caught:
            self.load({"w": torch.zeros(300, 10)}, checkpoint_url, storage_options)
        assert caught.value.file == store.describe(name)
        assert caught.value.offset == offset + length // 2
        assert "truncated" in str(caught.value)

    def test_a_missing_object_is_named(self, checkpoint_url: str, storage_options: Options) -> None:
        self.save({"w": random_bits((300, 10), torch.float32, 12)}, checkpoint_url, storage_options)
        name, _, _ = self.first_chunk(checkpoint_url, storage_options, "w")
        store = self.store(checkpoint_url, storage_options)
        store.delete(name)
        with pytest.raises(CorruptCheckpointError, match="missing") as caught:
            self.load({"w": torch.zeros(300, 10)}, checkpoint_url, storage_options)
        assert caught.value.file == store.describe(name)

    def test_without_committed_metadata_it_is_incomplete(
        self, checkpoint_url: str, storage_options: Options
    ) -> None:
        with pytest.raises(CheckpointNotFoundError):
            self.load({"w": torch.zeros(3)}, checkpoint_url, storage_options)
        self.save({"w": torch.ones(3)}, checkpoint_url, storage_options)
        store = self.store(checkpoint_url, storage_options)
        store.delete(METADATA_FILE_NAME)
        store.delete(PROBE_FILE_NAME)
        assert data_objects(store)
        with pytest.raises(IncompleteCheckpointError, match="no committed checkpoint"):
            self.load({"w": torch.zeros(3)}, checkpoint_url, storage_options)

    # many ranks

    def test_resharding_n_to_m_reads_what_each_rank_needs(
        self, checkpoint_url: str, storage_options: Options, rank_pool: Callable[[int], Any]
    ) -> None:
        args = (checkpoint_url, storage_options, self.use_fsspec, 13)
        self.ranks(rank_pool, 2).run(save_sharded_rows, *args)
        one = self.ranks(rank_pool, 1).run(load_resharded, *args, 0)
        assert one[0]["transferred"] <= 1.05 * one[0]["needed"]
        rows = self.ranks(rank_pool, 4).run(load_resharded, *args, 0)
        for counts in rows:  # a row split: each rank needs one run per saved chunk
            assert counts["transferred"] <= 1.05 * counts["needed"], counts
            assert counts["verified"] >= counts["needed"]
        columns = self.ranks(rank_pool, 4).run(load_resharded, *args, 1)
        for counts in columns:  # column slices of every row: the short gaps between
            # them are fetched along (coalesced), never more than the tensor once
            assert counts["needed"] <= counts["transferred"] <= 64 * 48 * 4 + 8 * 5, counts
            assert counts["verified"] >= counts["needed"]

    def test_a_rank_failing_mid_save_leaves_the_previous_checkpoint(
        self, checkpoint_url: str, storage_options: Options, rank_pool: Callable[[int], Any]
    ) -> None:
        args = (checkpoint_url, storage_options, self.use_fsspec)
        pool = self.ranks(rank_pool, 2)
        pool.run(save_sharded_rows, *args, 14)
        errors = pool.run(save_with_failing_rank, *args, 15)
        assert all("rank 1" in error and "injected" in error for error in errors), errors
        loaded = self.ranks(rank_pool, 1).run(load_resharded, *args, 14, 0)
        assert loaded[0]["needed"] > 0
        # The next good save commits and removes what the failed one left.
        pool.run(save_sharded_rows, *args, 16)
        reader = self.reader(checkpoint_url, storage_options)
        metadata = reader.read_metadata()
        referenced = {info.relative_path for info in metadata.storage_data.values()}
        assert data_objects(self.store(checkpoint_url, storage_options)) == referenced
