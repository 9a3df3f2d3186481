"""A fuzzing harness for the metadata decoder.

:func:`check_input` is the property every input must satisfy: decoding a
metadata file's bytes either succeeds or raises ``CheckpointFormatError`` /
``CorruptCheckpointError`` (never another exception type), within
:data:`BUDGET_S` seconds. ``tests/test_metadata_fuzz.py`` drives it with
hypothesis (structured mutations of genuine metadata, plus the crafted inputs
that once made decoding quadratic); for long runs it is an atheris target::

    pip install atheris
    python tests/fuzz_metadata.py -max_total_time=3600   # libFuzzer flags

Its inputs are whole metadata files: header and msgpack body. A body is
re-wrapped with a correct header and crc by :func:`wrap`, so mutations reach
the validation beyond the checksum instead of stopping at it.
"""

from __future__ import annotations

import struct
import sys
import time
from typing import Any

import crc32c
import msgpack

from distcp.errors import CheckpointFormatError, CorruptCheckpointError
from distcp.metadata_file import MAGIC, decode_metadata

BUDGET_S = 2.0
"""CPU seconds one input may take to decode (process time, so that other work
on a busy machine does not count). The genuine and crafted inputs here are
at most a few MB: a linear decoder needs well under a tenth of this, the
quadratic one it replaced took 3.4 to 12 s."""

_HEADER = struct.Struct("<8sIIQ")


def wrap(body: bytes, version: int = 1) -> bytes:
    """A metadata file around ``body``: magic, version, the body's crc32c, length."""
    return _HEADER.pack(MAGIC, version, crc32c.crc32c(body), len(body)) + body


def wrap_tree(tree: Any) -> bytes:
    return wrap(msgpack.packb(tree, use_bin_type=True))


def check_input(data: bytes, budget_s: float = BUDGET_S) -> str:
    """Decode ``data``; "ok" or the typed error's class name. Raises
    AssertionError when the decoder raised another type or took too long."""
    started = time.process_time()
    try:
        decode_metadata(data, source="fuzzed.metadata")
        outcome = "ok"
    except (CheckpointFormatError, CorruptCheckpointError) as error:
        outcome = type(error).__name__
    except Exception as error:  # the property: nothing else may escape
        raise AssertionError(
            f"the decoder raised {type(error).__name__}: {error}"[:2000]
        ) from error
    elapsed = time.process_time() - started
    assert elapsed <= budget_s, f"decoding {len(data)} bytes took {elapsed:.2f} CPU s"
    return outcome


def _atheris_main() -> None:  # pragma: no cover - long runs only
    import atheris  # type: ignore[import-not-found]

    def one(data: bytes) -> None:
        check_input(data)
        if len(data) > 4:  # the same bytes as a body behind a valid header
            check_input(wrap(data))

    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":  # pragma: no cover
    _atheris_main()
