"""An S3-compatible server on 127.0.0.1 for tests and benchmarks: moto's
server mode in a child process, with a byte counter in front of it.

``with LocalS3Server() as server:`` starts it on a free port and stops it on
leaving; :attr:`LocalS3Server.storage_options` are what s3fs needs to reach
it (endpoint and dummy credentials), so no client ever looks for a public
endpoint. :meth:`LocalS3Server.traffic` reports the bytes the server received
and sent and the requests it answered (reset with :meth:`reset_traffic`):
what a benchmark compares between libraries, counted at the server the same
way for all of them. Needs ``moto[server]`` (the ``dev`` extra).

Run directly (``python -m distcp.testing.s3_server``) it prints its port and
serves until its standard input closes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["LocalS3Server"]

_TRAFFIC_PATH = "/_distcp/traffic"
_CREDENTIALS = {"key": "testing", "secret": "testing"}


class LocalS3Server:
    """A moto S3 server in a child process, listening on 127.0.0.1."""

    def __init__(self, *, buckets: Iterable[str] = ("distcp",)) -> None:
        self.buckets = list(buckets)
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (and nothing else)."""
        return {
            "endpoint_url": self.endpoint_url,
            **_CREDENTIALS,
            "client_kwargs": {"region_name": "us-east-1"},
        }

    def start(self) -> LocalS3Server:
        environment = dict(os.environ, MOTO_ALLOW_NONEXISTENT_REGION="true")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "distcp.testing.s3_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError(f"the local S3 server did not start (it said {line!r})")
        self.port = int(line)
        for bucket in self.buckets:
            self.create_bucket(bucket)
        return self

    def create_bucket(self, bucket: str) -> None:
        request = urllib.request.Request(f"{self.endpoint_url}/{bucket}", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def traffic(self) -> dict[str, int]:
        """``{"received": bytes, "sent": bytes, "requests": n}`` since the last reset."""
        with urllib.request.urlopen(self.endpoint_url + _TRAFFIC_PATH, timeout=30) as answer:
            counts: dict[str, int] = json.loads(answer.read())
        return counts

    def reset_traffic(self) -> None:
        request = urllib.request.Request(self.endpoint_url + _TRAFFIC_PATH, method="DELETE")
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _Counted:
    """WSGI middleware counting request and response bytes; answers
    ``GET``/``DELETE`` of the traffic path itself."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.counts = {"received": 0, "sent": 0, "requests": 0}

    def _add(self, key: str, amount: int) -> None:
        with self.lock:
            self.counts[key] += amount

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == _TRAFFIC_PATH:
            if environ.get("REQUEST_METHOD") == "DELETE":
                with self.lock:
                    self.counts = dict.fromkeys(self.counts, 0)
            with self.lock:
                body = json.dumps(self.counts).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        self._add("requests", 1)
        self._add("received", int(environ.get("CONTENT_LENGTH") or 0))
        return self._counting(self.app(environ, start_response))

    def _counting(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        try:
            for chunk in chunks:
                self._add("sent", len(chunk))
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def _serve() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    app = _Counted(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(server.server_address[1], flush=True)
    sys.stdin.read()  # until the parent closes it (or exits)
    server.shutdown()


if __name__ == "__main__":
    _serve()
