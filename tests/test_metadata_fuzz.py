"""The metadata decoder under hostile input (harness: ``fuzz_metadata.py``):
every input ends in success or a typed format error within a time budget
per input, including the inputs that once made decoding quadratic (hash
floods, chunk grids) or escaped as a bare ``ValueError`` (huge ints)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distcp
from distcp.errors import CheckpointFormatError
from distcp.filesystem.layout import METADATA_FILE_NAME
from distcp.hash_spread import MAX_EQUAL_HASHES
from distcp.metadata_file import decode_metadata
from distcp.value_codec import EXT_BIGINT, EXT_SET, EXT_TUPLE
from fuzz_metadata import check_input, wrap, wrap_tree

HASH_MODULUS = (1 << 61) - 1  # CPython: hash(n) == n mod this, for n >= 0


@functools.cache
def genuine_body(root: str) -> bytes:
    """The body of a real metadata file: tensors of several dtypes, values,
    nested keys."""
    path = Path(root) / "genuine"
    state = {
        "model": {"w": torch.randn(8, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
        "step": 7,
        "config": {"lr": 0.1, "betas": (0.9, 0.99), "name": "run"},
        "mask": torch.ones(3, dtype=torch.bool),
    }
    distcp.save(state, checkpoint_id=path, no_dist=True)
    return (path / METADATA_FILE_NAME).read_bytes()[24:]


@pytest.fixture(scope="module")
def body(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return genuine_body(str(tmp_path_factory.mktemp("fuzz")))


def test_the_genuine_metadata_decodes(body: bytes) -> None:
    assert check_input(wrap(body)) == "ok"


# --- structured mutation ---------------------------------------------------------------------

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**32, 2**63 - 1, 2**64 - 1]),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=16),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nodes(tree: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into ``tree`` (map keys and list indices)."""
    found = [path]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += _nodes(value, (*path, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += _nodes(value, (*path, index))
    return found


def _parent(tree: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        tree = tree[step]
    return tree


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_structured_mutations_end_in_success_or_a_typed_error(body: bytes, data: Any) -> None:
    tree = msgpack.unpackb(body, raw=False, strict_map_key=False)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _nodes(tree)
        path = data.draw(st.sampled_from(paths[1:]), label="at")
        parent = _parent(tree, path)
        action = data.draw(st.sampled_from(["replace", "delete", "duplicate"]), label="action")
        if action == "replace":
            parent[path[-1]] = data.draw(values, label="with")
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.insert(path[-1], copy.deepcopy(parent[path[-1]]))
    check_input(wrap_tree(tree))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_byte_mutations_end_in_success_or_a_typed_error(body: bytes, data: Any) -> None:
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 8), label="flips")):
        position = data.draw(st.integers(0, len(mutated) - 1), label="position")
        mutated[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(mutated)), label="length")
    check_input(wrap(bytes(mutated[:cut])))  # valid header: reaches the body's validation
    check_input(bytes(mutated[:cut]))  # and as a whole file


# --- crafted inputs that were quadratic or escaped untyped ------------------------------------


def _bigint(n: int) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_BIGINT, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))


def _colliding_bigints(count: int) -> list[msgpack.ExtType]:
    """``count`` distinct ints beyond 64 bits that all hash to 0."""
    return [_bigint((2**70 // HASH_MODULUS + i) * HASH_MODULUS) for i in range(count)]


def _with_planner_data(body: bytes, value: Any) -> bytes:
    tree = msgpack.unpackb(body, raw=False, strict_map_key=False)
    tree["planner_data"] = msgpack.packb(value, use_bin_type=True, strict_types=False)
    return wrap_tree(tree)


@pytest.mark.parametrize("shape", ["set", "dict-keys", "tuple-keys"])
def test_hash_floods_are_refused_quickly(body: bytes, shape: str) -> None:
    items = _colliding_bigints(20_000)
    if shape == "set":
        value: Any = msgpack.ExtType(EXT_SET, msgpack.packb(items))
    elif shape == "dict-keys":
        value = {item: 0 for item in items}
    else:  # tuples whose items collide pairwise: (h, h') all hash alike
        pairs = [
            msgpack.ExtType(EXT_TUPLE, msgpack.packb([a, b]))
            for a in items[:150]
            for b in items[:150]
        ]
        value = {pair: 0 for pair in pairs}
    data = _with_planner_data(body, value)
    assert check_input(data) == "CheckpointFormatError"
    with pytest.raises(CheckpointFormatError, match="share one hash value"):
        decode_metadata(data, source="flood")


def test_a_few_colliding_keys_are_fine(body: bytes) -> None:
    value = {item: 0 for item in _colliding_bigints(MAX_EQUAL_HASHES)}
    assert check_input(_with_planner_data(body, value)) == "ok"


def test_a_huge_int_repeated_as_a_dict_key_is_a_format_error(body: bytes) -> None:
    tree = msgpack.unpackb(body, raw=False, strict_map_key=False)
    huge = msgpack.packb(_bigint(10**5000))
    # Two equal keys: the message names the repeated key without converting it to decimal.
    tree["planner_data"] = b"\x82" + huge + b"\x01" + huge + b"\x02"
    assert check_input(wrap_tree(tree)) == "CheckpointFormatError"
    with pytest.raises(CheckpointFormatError, match=r"<int of \d+ bits>.*repeats"):
        decode_metadata(wrap_tree(tree), source="huge")


def _tensor_entry(
    key: str, shape: list[int], chunks: list[tuple[list[int], list[int]]]
) -> dict[str, Any]:
    """A uint8 tensor entry whose chunks all point at byte 0 of file 0 with
    their own length (the metadata's validation is under test, not the data)."""
    return {
        "key": key,
        "type": "tensor",
        "dtype": "uint8",
        "shape": shape,
        "requires_grad": False,
        "chunks": [
            {
                "offsets": offsets,
                "sizes": sizes,
                "file": 0,
                "offset": 0,
                "length": _prod(sizes),
                "crc32c": [0] * -(-_prod(sizes) // (1 << 20)),
            }
            for offsets, sizes in chunks
        ],
    }


def _prod(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= value
    return result


def _with_entry(body: bytes, entry: dict[str, Any]) -> bytes:
    tree = msgpack.unpackb(body, raw=False, strict_map_key=False)
    tree["entries"].append(entry)
    tree["files"][0]["size"] = max(tree["files"][0]["size"], 1 << 30)  # room for any chunk
    return wrap_tree(tree)


def test_a_150_by_150_grid_of_chunks_decodes_within_budget(body: bytes) -> None:
    grid = [([10 * i, 10 * j], [10, 10]) for i in range(150) for j in range(150)]
    assert check_input(_with_entry(body, _tensor_entry("grid", [1500, 1500], grid))) == "ok"
    moved = [*grid[:-1], ([1490, 1485], [10, 10])]  # overlaps its neighbour, same volume
    assert check_input(_with_entry(body, _tensor_entry("grid", [1500, 1500], moved))) == (
        "CheckpointFormatError"
    )
    holed = grid[:-1]
    assert check_input(_with_entry(body, _tensor_entry("grid", [1500, 1500], holed))) == (
        "CheckpointFormatError"
    )


def test_chunk_offsets_crafted_to_collide_are_refused(body: bytes) -> None:
    """3-d offsets whose every coordinate is one of 4 values of equal hash:
    64 distinct offsets with one hash, as keys of the storage table."""
    top = 4 * HASH_MODULUS
    coords = [5 + k * HASH_MODULUS for k in range(4)]
    chunks = [([a, b, c], [1, 1, 1]) for a in coords for b in coords for c in coords]
    data = _with_entry(body, _tensor_entry("t", [top, top, top], chunks))
    assert check_input(data) == "CheckpointFormatError"
    with pytest.raises(CheckpointFormatError, match=r"key 't' chunk 32.*share one hash value"):
        decode_metadata(data, source="flood")
