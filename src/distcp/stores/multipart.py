"""Writing one data object to S3 (or an S3-compatible server) as a parallel
multipart upload, with bounded memory.

An object of at most ``knobs.UPLOAD_SINGLE_PUT_LIMIT`` bytes is buffered and
sent as one ``PutObject`` when it is closed (a rank writes several objects at
once, one per writer thread, so single puts still run in parallel). A larger
one becomes a multipart upload: the writer thread fills a part buffer of
``knobs.UPLOAD_PART_SIZE`` bytes; each full part is copied out and uploaded by
a small pool while the buffer fills again, at most ``knobs.UPLOAD_CONCURRENCY``
at once (the writer waits for a free slot, so a sink holds at most
``concurrency + 1`` parts). The upload is completed in ``close``; any failure aborts it, so no half
object ever becomes visible (S3 shows an object only once its multipart upload
completes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from distcp import knobs

__all__ = ["MultipartSink"]

log = logging.getLogger("distcp")

#: S3's smallest part (all but the last) and largest part count.
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000


class MultipartSink:
    """A data object uploaded in parts through ``call`` (s3fs's ``call_s3``)."""

    def __init__(
        self,
        call: Any,
        bucket: str,
        key: str,
        *,
        part_size: int = knobs.UPLOAD_PART_SIZE,
        concurrency: int = knobs.UPLOAD_CONCURRENCY,
        single_put_limit: int | None = None,
    ) -> None:
        self._call = call
        self.single_put_limit = (
            knobs.UPLOAD_SINGLE_PUT_LIMIT if single_put_limit is None else single_put_limit
        )
        self._whole: bytearray | None = bytearray()  # until it outgrows a single put
        self.bucket, self.key = bucket, key
        self.base_part_size = max(MIN_PART_SIZE, part_size)
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="distcp-upload")
        self._buffer = bytearray()
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._finished = False

    def _part_size(self, number: int) -> int:
        """Part ``number``'s size (from 1): doubling every 1,000 parts."""
        return self.base_part_size << ((number - 1) // 1000)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._whole is not None:
            if len(self._whole) + len(view) <= self.single_put_limit:
                self._whole += view
                return
            whole, self._whole = memoryview(self._whole), None  # too large: go multipart
            self._buffer = bytearray(self._part_size(1))
            self.write(whole)
        while len(view):
            take = min(len(view), len(self._buffer) - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._buffer):
                self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            created = self._call("create_multipart_upload", Bucket=self.bucket, Key=self.key)
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise OSError(f"s3://{self.bucket}/{self.key}: more than {MAX_PARTS} parts")
        body = _body(memoryview(self._buffer)[: self._filled])  # the buffer is reused below
        self._slots.acquire()  # at most `concurrency` parts in flight
        try:
            future = self._pool.submit(self._upload, number, body)
        except BaseException:
            self._slots.release()
            raise
        self._parts.append(future)
        if len(self._buffer) != self._part_size(number + 1):  # every 1,000 parts
            self._buffer = bytearray(self._part_size(number + 1))
        self._filled = 0
        for done in self._parts:  # a failed part stops the writer early
            if done.done() and done.exception() is not None:
                raise done.exception()  # type: ignore[misc]

    def _upload(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            answer = self._call(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}
        finally:
            self._slots.release()

    def close(self) -> None:
        try:
            if self._whole is not None:  # small enough: one put
                self._call("put_object", Bucket=self.bucket, Key=self.key, Body=_body(self._whole))
            elif self._upload_id is None:  # outgrew a single put within its first part
                self._call(
                    "put_object",
                    Bucket=self.bucket,
                    Key=self.key,
                    Body=_body(memoryview(self._buffer)[: self._filled]),
                )
            else:
                if self._filled:
                    self._send_part()
                parts = [future.result() for future in self._parts]
                self._call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            self._finished = True
        except BaseException:
            self.abort()
            raise
        finally:
            self._pool.shutdown(wait=True)
            self._buffer = bytearray()
            self._whole = None

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._buffer = bytearray()
        self._whole = None
        if self._upload_id is not None and not self._finished:
            with contextlib.suppress(Exception):  # the error that matters is the caller's
                self._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                )
            self._upload_id = None
        if self._finished:  # completed, then given up: remove the object
            with contextlib.suppress(Exception):
                self._call("delete_object", Bucket=self.bucket, Key=self.key)


def _body(data: bytearray | memoryview) -> bytes:
    """What a request carries: ``bytes``. botocore takes a ``bytearray`` too,
    but sends it through a path that costs twice the CPU of one copy to bytes."""
    return bytes(data)
