"""The store conformance suite (distcp.testing.StoreTests) on every store:
local directories, ``file://`` through fsspec, ``memory://``, and S3 against
a real S3-compatible server (moto) that the fixture starts on 127.0.0.1."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import distcp
from distcp.stores import LocalStore, store_for
from distcp.testing.s3_server import LocalS3Server
from distcp.testing.store_tests import StoreTests

_names = itertools.count()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[LocalS3Server]:
    with LocalS3Server(buckets=["distcp-tests"]) as server:
        yield server


class TestLocalStore(StoreTests):
    @pytest.fixture
    def checkpoint_url(self, tmp_path: Path) -> str:
        return str(tmp_path / "ckpt")


class TestFsspecFileStore(StoreTests):
    """A local path through fsspec's file system: the object-store code path
    (no mapping, no rename) on a disk every rank shares."""

    use_fsspec = True

    @pytest.fixture
    def checkpoint_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/ckpt"


class TestMemoryStore(StoreTests):
    shared_between_processes = False

    @pytest.fixture
    def checkpoint_url(self) -> str:
        return f"memory://distcp-tests/ckpt-{next(_names)}"


class TestS3Store(StoreTests):
    @pytest.fixture
    def checkpoint_url(self) -> str:
        return f"s3://distcp-tests/ckpt-{next(_names)}"

    @pytest.fixture
    def storage_options(self, s3_server: LocalS3Server) -> dict[str, Any]:
        return s3_server.storage_options

    def test_large_objects_upload_in_parallel_parts(
        self,
        checkpoint_url: str,
        storage_options: dict[str, Any],
        s3_server: LocalS3Server,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A data object larger than a single put is a multipart upload of
        parts of the given size; it loads bit-exact."""
        monkeypatch.setattr(distcp.knobs, "UPLOAD_SINGLE_PUT_LIMIT", 8 << 20)
        state = {"w": torch.randn(3 << 20)}  # 12 MiB in one object: three 5 MiB parts
        writer = distcp.FsspecWriter(
            checkpoint_url, thread_count=1, part_size=5 << 20, **storage_options
        )
        s3_server.reset_traffic()
        distcp.save(state, storage_writer=writer, no_dist=True)
        traffic = s3_server.traffic()
        assert traffic["received"] >= state["w"].nbytes
        assert traffic["requests"] >= 5  # create, three parts, complete (and the metadata)
        out = {"w": torch.zeros(3 << 20)}
        reader = distcp.FsspecReader(checkpoint_url, **storage_options)
        distcp.load(out, storage_reader=reader, no_dist=True)
        assert torch.equal(out["w"], state["w"])
        parts = writer.store.fs.call_s3("list_multipart_uploads", Bucket="distcp-tests")
        assert not parts.get("Uploads")  # none left open

    def test_overwrite_refusal_is_a_conditional_create(
        self, checkpoint_url: str, storage_options: dict[str, Any]
    ) -> None:
        store = store_for(checkpoint_url, storage_options)
        assert store.capabilities.conditional_create
        store.publish("x", b"1", temporary_name="unused", sync=True, if_absent=True)
        with pytest.raises(FileExistsError):
            store.publish("x", b"2", temporary_name="unused", sync=True, if_absent=True)
        assert store.read_whole("x", "test object") == b"1"

    def test_a_failed_upload_leaves_no_open_multipart_upload(
        self, checkpoint_url: str, storage_options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(distcp.knobs, "UPLOAD_SINGLE_PUT_LIMIT", 0)
        store = store_for(checkpoint_url, storage_options, part_size=5 << 20)
        sink = store.create("data", sync=True)
        sink.write(bytes(6 << 20))  # one part sent
        fs = store.fs  # type: ignore[attr-defined]
        assert fs.call_s3("list_multipart_uploads", Bucket="distcp-tests").get("Uploads")
        sink.abort()
        assert not fs.call_s3("list_multipart_uploads", Bucket="distcp-tests").get("Uploads")
        assert not store.exists("data")

    def test_an_unreachable_endpoint_fails_naming_it(self, checkpoint_url: str) -> None:
        closed: dict[str, Any] = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
        closed["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 2}
        with pytest.raises(distcp.DistributedCheckpointError, match=r"127\.0\.0\.1:9"):
            distcp.save(
                {"x": torch.ones(2)},
                storage_writer=distcp.FileSystemWriter(checkpoint_url, storage_options=closed),
                no_dist=True,
            )

    def test_credentials_are_never_logged(
        self,
        checkpoint_url: str,
        storage_options: dict[str, Any],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        options = dict(storage_options, secret="testing")  # moto accepts any secret
        with caplog.at_level("DEBUG", logger="distcp"):
            distcp.save(
                {"x": torch.ones(2)},
                storage_writer=distcp.FsspecWriter(checkpoint_url, **options),
                no_dist=True,
            )
            writer = distcp.FsspecWriter(checkpoint_url, **options)
            assert "testing" not in repr(writer.store)
        assert "testing" not in caplog.text


def test_a_local_path_is_a_local_store_and_a_url_is_not(tmp_path: Path) -> None:
    assert isinstance(store_for(tmp_path), LocalStore)
    assert isinstance(store_for(f"file://{tmp_path}"), LocalStore)
    memory = store_for("memory://x/y")
    assert not isinstance(memory, LocalStore)
    assert not memory.capabilities.mappable and not memory.capabilities.atomic_rename
    assert not isinstance(store_for(tmp_path, use_fsspec=True), LocalStore)


def test_an_fsspec_store_survives_pickling_for_the_writer_process() -> None:
    store = store_for("memory://pickled/ckpt")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.location == store.location and copy.capabilities == store.capabilities


def test_async_save_to_an_object_store(s3_server: LocalS3Server) -> None:
    url = f"s3://distcp-tests/async-{next(_names)}"
    state = {"w": torch.randn(1000, 100)}
    writer = distcp.FsspecWriter(url, **s3_server.storage_options)
    distcp.async_save(state, storage_writer=writer, no_dist=True).result()
    out = {"w": torch.zeros(1000, 100)}
    reader = distcp.FsspecReader(url, **s3_server.storage_options)
    distcp.load(out, storage_reader=reader, no_dist=True)
    assert torch.equal(out["w"], state["w"])
