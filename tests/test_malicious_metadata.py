"""Hostile torch DCP checkpoints: a ``.metadata`` pickle or data file made to
run code, exhaust memory or read outside the checkpoint. Each is refused with
a typed error before it can act, and each payload is shown to be live: the
same bytes given to plain ``pickle.loads`` (or to ``torch.load`` without
``weights_only``) do create the marker file that distcp's load never creates."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp
from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

import distcp
from distcp.torch_dcp import read_torch_metadata, safe_loads
from distcp.torch_dcp.safe_unpickle import ALLOWED_GLOBALS

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

DCP = "torch.distributed.checkpoint.metadata"


# --- a tiny pickle assembler (protocol 4 opcodes), so payloads say what they do -------------


def s(text: str) -> bytes:
    data = text.encode()
    return (
        b"\x8c" + bytes([len(data)]) if len(data) < 256 else b"X" + struct.pack("<I", len(data))
    ) + data


def glob(module: str, name: str) -> bytes:
    return s(module) + s(name) + b"\x93"  # STACK_GLOBAL


def call(function: bytes, *args: bytes) -> bytes:
    return function + b"(" + b"".join(args) + b"tR"  # MARK args TUPLE REDUCE


def pickle_of(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."  # PROTO 4 ... STOP


# --- the checkpoint under attack -------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A genuine torch DCP checkpoint (a tensor and a byte value) to tamper with."""
    path = tmp_path / "ckpt"
    torch_dcp.save({"w": torch.arange(6.0), "step": 3}, checkpoint_id=str(path), no_dist=True)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def load(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = {"w": torch.zeros(6), "step": 0}
    distcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def refused(
    checkpoint: Path,
    metadata: bytes,
    marker: Path,
    match: str,
    error: type[Exception] = distcp.CheckpointFormatError,
) -> None:
    """``metadata`` as the checkpoint's ``.metadata`` is refused with ``error``
    matching ``match`` and leaves no marker."""
    (checkpoint / ".metadata").write_bytes(metadata)
    with pytest.raises(error, match=match) as caught:
        load(checkpoint)
    assert (
        str(checkpoint / ".metadata") in str(caught.value)
        or error is not distcp.CheckpointFormatError
    )
    assert not marker.exists(), "the payload ran"


def live(payload: Callable[[], Any], marker: Path) -> None:
    """The control: run unprotected, the payload creates the marker."""
    with contextlib.suppress(Exception):  # what the payload returns need not be metadata
        payload()
    assert marker.exists(), "the payload is not live: the test would prove nothing"
    marker.unlink()


def touch(marker: Path) -> str:
    return f"touch {marker}"


# --- code execution through globals ----------------------------------------------------------


def test_os_system_through_reduce(checkpoint: Path, marker: Path) -> None:
    payload = pickle_of(call(glob("os", "system"), s(touch(marker))))
    refused(checkpoint, payload, marker, r"os\.system.*refused, never imported or run")
    live(lambda: pickle.loads(payload), marker)


def test_posix_system_as_the_real_pickler_writes_it(checkpoint: Path, marker: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (touch(marker),))

    payload = pickle.dumps(Exploit(), protocol=4)
    refused(checkpoint, payload, marker, r"posix\.system")
    live(lambda: pickle.loads(payload), marker)


@pytest.mark.parametrize("builtin", ["eval", "exec"])
def test_builtins_eval_and_exec(checkpoint: Path, marker: Path, builtin: str) -> None:
    code = f"open({str(marker)!r}, 'w').close()"
    payload = pickle_of(call(glob("builtins", builtin), s(code)))
    refused(checkpoint, payload, marker, rf"builtins\.{builtin}")
    live(lambda: pickle.loads(payload), marker)


def test_getattr_chain_to_os_system(checkpoint: Path, marker: Path) -> None:
    os_module = call(glob("builtins", "__import__"), s("os"))
    system = call(glob("builtins", "getattr"), os_module, s("system"))
    payload = pickle_of(call(system, s(touch(marker))))
    refused(checkpoint, payload, marker, r"builtins\.getattr")
    live(lambda: pickle.loads(payload), marker)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.serialization", "os.system"),  # a dotted name reaching through a module
        ("torch", "serialization.os.system"),
        (DCP, "Metadata.__init__.__globals__"),  # through an allowed class
        ("torch", "Size.__class__"),
        ("torch", "load"),
    ],
)
def test_dotted_names_do_not_reach_through_allowed_modules(
    checkpoint: Path, marker: Path, module: str, name: str
) -> None:
    payload = pickle_of(glob(module, name))
    refused(checkpoint, payload, marker, "refused, never imported or run")


def test_subprocess_popen(checkpoint: Path, marker: Path) -> None:
    argv = b"]" + b"(" + s("touch") + s(str(marker)) + b"e"  # EMPTY_LIST MARK ... APPENDS
    payload = pickle_of(glob("subprocess", "Popen") + b"(" + argv + b"tR" + b"0" + b"N")
    refused(checkpoint, payload, marker, r"subprocess\.Popen")

    def run() -> None:
        pickle.loads(payload)
        for _ in range(500):  # Popen returns at once: wait for the child
            if marker.exists():
                return
            time.sleep(0.01)

    live(run, marker)


class Planted:
    """Put where torch puts plain data; pickles as a call of os.system."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def genuine_metadata(checkpoint: Path) -> Any:
    with open(checkpoint / ".metadata", "rb") as file:
        return pickle.load(file)  # our own checkpoint: trusted here, to tamper with


def test_a_global_deep_inside_genuine_metadata(checkpoint: Path, marker: Path) -> None:
    metadata = genuine_metadata(checkpoint)
    metadata.planner_data["step"] = ("step", [{"deep": (1, Planted(touch(marker)))}])
    payload = pickle.dumps(metadata)
    refused(checkpoint, payload, marker, r"posix\.system")
    live(lambda: pickle.loads(payload), marker)


def test_a_global_in_place_of_a_file_name(checkpoint: Path, marker: Path) -> None:
    metadata = genuine_metadata(checkpoint)
    for info in metadata.storage_data.values():
        info.relative_path = Planted(touch(marker))
    payload = pickle.dumps(metadata)
    refused(checkpoint, payload, marker, r"posix\.system")
    live(lambda: pickle.loads(payload), marker)


# --- opcodes that build objects another way --------------------------------------------------


def test_inst_opcode(checkpoint: Path, marker: Path) -> None:
    payload = b"\x80\x02(S'" + touch(marker).encode() + b"'\nios\nsystem\n."
    refused(checkpoint, payload, marker, r"INST.*os\.system.*refused")
    live(lambda: pickle.loads(payload), marker)


def test_obj_opcode(checkpoint: Path, marker: Path) -> None:
    payload = pickle_of(b"(" + glob("os", "system") + s(touch(marker)) + b"o")
    refused(checkpoint, payload, marker, r"OBJ.*refused")
    live(lambda: pickle.loads(payload), marker)


def test_inst_and_obj_are_refused_even_for_an_allowed_class(checkpoint: Path, marker: Path) -> None:
    refused(checkpoint, b"\x80\x02(" + b"K\x03" + b"itorch\nSize\n.", marker, "INST")
    refused(checkpoint, pickle_of(b"(" + glob("torch", "Size") + b"o"), marker, "OBJ")


def test_newobj_of_a_disallowed_class(checkpoint: Path, marker: Path) -> None:
    argv = b"]" + b"(" + s("touch") + s(str(marker)) + b"e"
    payload = pickle_of(glob("subprocess", "Popen") + argv + b"\x85" + b"\x81")  # TUPLE1 NEWOBJ
    refused(checkpoint, payload, marker, r"subprocess\.Popen")


def test_newobj_of_an_allowed_class_with_arguments(checkpoint: Path, marker: Path) -> None:
    payload = pickle_of(glob(DCP, "Metadata") + b"}" + b"\x85" + b"\x81")
    refused(checkpoint, payload, marker, "built with arguments")
    payload = pickle_of(glob("torch", "Size") + b")" + b"\x81")  # a factory is no class
    refused(checkpoint, payload, marker, "not a valid metadata pickle")


def test_torch_load_style_persistent_ids(checkpoint: Path, marker: Path) -> None:
    storage = b"(" + s("storage") + glob("torch", "FloatStorage") + s("0") + s("cpu") + b"K\x06t"
    refused(checkpoint, pickle_of(storage + b"Q"), marker, "BINPERSID.*persistent id")
    refused(checkpoint, b"\x80\x02Pstorage0\n.", marker, "PERSID.*persistent id")


def test_a_real_torch_save_file_as_metadata(checkpoint: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    refused(checkpoint, buffer.getvalue(), marker, "refused|not a valid")


# --- __setstate__ / BUILD abuse --------------------------------------------------------------


def test_build_cannot_alter_a_dtype_or_the_memory_format_enum(
    checkpoint: Path, marker: Path
) -> None:
    attack_dtype = pickle_of(glob("torch", "float32") + b"}" + s("itemsize") + b"K\x07" + b"sb")
    refused(checkpoint, attack_dtype, marker, "not a valid metadata pickle")
    member = call(glob(DCP, "_MEM_FORMAT_ENCODING"), b"K\x00")
    attack_enum = pickle_of(member + b"}" + s("_value_") + b"K\x09" + b"sb")
    refused(checkpoint, attack_enum, marker, "given its state twice")
    assert torch.float32.itemsize == 4
    assert _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT.value == 0
    # the same bytes through plain pickle do change the process-wide enum member
    pickle.loads(attack_enum)
    try:
        assert _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT._value_ == 9
    finally:
        _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT._value_ = 0


@pytest.mark.parametrize("attribute", ["x", "__defaults__", "function", "_value_", "kind"])
def test_no_allowed_global_can_be_altered_by_a_build(
    checkpoint: Path, marker: Path, attribute: str
) -> None:
    genuine = (checkpoint / ".metadata").read_bytes()
    before = read_torch_metadata(checkpoint)
    for module, name in ALLOWED_GLOBALS:
        one = b"}" + s(attribute) + b"K\x01" + b"s"  # {attribute: 1}
        for state in (one, b"N" + one + b"\x86"):  # as __dict__ state, as slot state
            payload = pickle_of(glob(module, name) + state + b"b")
            refused(checkpoint, payload, marker, "not a valid metadata pickle|refused")
    (checkpoint / ".metadata").write_bytes(genuine)
    assert read_torch_metadata(checkpoint) == before
    assert load(checkpoint)["step"] == 3


def test_build_on_a_class_or_a_record_twice(checkpoint: Path, marker: Path) -> None:
    on_class = pickle_of(glob(DCP, "TensorProperties") + b")" + b"b")
    refused(checkpoint, on_class, marker, "not a valid metadata pickle")
    twice = pickle_of(glob(DCP, "StorageMeta") + b")\x81" + b"}b" + b"}b")
    refused(checkpoint, twice, marker, "given its state twice")


def test_setstate_state_with_a_payload(checkpoint: Path, marker: Path) -> None:
    state = b"(" + call(glob("os", "system"), s(touch(marker))) + b"t"
    payload = pickle_of(glob(DCP, "TensorProperties") + b")\x81" + state + b"b")
    refused(checkpoint, payload, marker, r"os\.system")
    live(lambda: pickle.loads(payload), marker)


def test_fields_of_the_wrong_type_are_refused_by_the_structure_check(
    checkpoint: Path, marker: Path
) -> None:
    metadata = genuine_metadata(checkpoint)
    entry = metadata.state_dict_metadata["w"]
    entry.chunks[0].sizes = torch.Size([7])  # past the tensor's end
    refused(checkpoint, pickle.dumps(metadata), marker, r"key 'w' chunk 0.*outside shape")
    entry.chunks[0].sizes = torch.Size([6])
    entry.chunks.append(entry.chunks[0])
    refused(checkpoint, pickle.dumps(metadata), marker, "share|same offsets|overlap")
    entry.chunks.pop()
    metadata.state_dict_metadata["step"] = "not metadata"
    refused(
        checkpoint, pickle.dumps(metadata), marker, r"key 'step'.*expected a TensorStorageMetadata"
    )


def _gap(metadata: Any) -> None:
    entry = metadata.state_dict_metadata["w"]
    entry.chunks[0].sizes = torch.Size([5])


def _no_storage(metadata: Any) -> None:
    metadata.storage_data = {
        index: info for index, info in metadata.storage_data.items() if index.fqn != "w"
    }


def _stray_storage(metadata: Any) -> None:
    info = next(iter(metadata.storage_data.values()))
    metadata.storage_data[type(next(iter(metadata.storage_data)))("ghost")] = info


def _unknown_field(metadata: Any) -> None:
    metadata.state_dict_metadata["w"].chunks[0].strides = torch.Size([1])


def _bad_dtype(metadata: Any) -> None:
    metadata.state_dict_metadata["w"].properties.dtype = "float32"


def _bad_version(metadata: Any) -> None:
    metadata.version = 1


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (_gap, r"key 'w'.*do not cover"),
        (_no_storage, r"key 'w' chunk at \[0\]: no storage entry"),
        (_stray_storage, r"key 'ghost'.*an item the checkpoint lacks"),
        (_unknown_field, r"unknown fields \['strides'\]"),
        (_bad_dtype, r"key 'w': dtype is str"),
        (_bad_version, r"version is a int"),
    ],
    ids=["gap", "no-storage", "stray-storage", "unknown-field", "bad-dtype", "bad-version"],
)
def test_impossible_structures(
    checkpoint: Path, marker: Path, damage: Callable[[Any], None], pattern: str
) -> None:
    metadata = genuine_metadata(checkpoint)
    damage(metadata)
    refused(checkpoint, pickle.dumps(metadata), marker, pattern)


# --- memory ----------------------------------------------------------------------------------

_CHILD = """
import pickle, sys
from distcp.errors import CheckpointFormatError
from distcp.torch_dcp import safe_loads
payload = bytes.fromhex(sys.argv[1])
try:
    safe_loads(payload, source="x")
    print("distcp: loaded")
except CheckpointFormatError as exc:
    print("distcp: refused:", exc)
try:
    pickle.loads(payload)
    print("pickle: loaded")
except MemoryError:
    print("pickle: MemoryError")
except Exception as exc:
    print("pickle:", type(exc).__name__)
"""


def run_capped(payload: bytes) -> str:
    """Run distcp's and plain pickle's load of ``payload`` in a child whose
    address space is capped at 4 GiB: a regression cannot take the machine down."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    done = subprocess.run(
        [sys.executable, "-c", _CHILD, payload.hex()],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=cap,
        check=False,
    )
    return done.stdout + done.stderr


def test_a_memo_index_that_would_allocate_a_huge_table() -> None:
    # LONG_BINPUT 2**31: the C unpickler would grow its memo to 2**32 pointers (32 GiB, zeroed)
    payload = pickle_of(b"N" + b"r" + struct.pack("<I", 1 << 31))
    out = run_capped(payload)
    assert "distcp: refused" in out and "memo index" in out, out
    assert "pickle: MemoryError" in out, out  # the control: it is an allocation bomb


def test_a_declared_length_far_past_the_end(checkpoint: Path, marker: Path) -> None:
    # BINBYTES8 declaring 2**40 bytes: allocated up front by the C unpickler
    payload = pickle_of(b"\x8e" + struct.pack("<Q", 1 << 40) + b"abc")
    refused(checkpoint, payload, marker, "declares 1099511627776 bytes")
    out = run_capped(payload)
    assert "distcp: refused" in out and "pickle: MemoryError" in out, out


def test_a_tensor_claiming_a_huge_size(checkpoint: Path, marker: Path) -> None:
    metadata = genuine_metadata(checkpoint)
    entry = metadata.state_dict_metadata["w"]
    entry.size = torch.Size([1 << 40, 1 << 40])
    entry.chunks[0].offsets = torch.Size([0, 0])
    entry.chunks[0].sizes = torch.Size([1 << 40, 1 << 40])
    refused(checkpoint, pickle.dumps(metadata), marker, "impossibly large")
    entry.size = entry.chunks[0].sizes = torch.Size([1 << 30])
    entry.chunks[0].offsets = torch.Size([0])
    refused(checkpoint, pickle.dumps(metadata), marker, r"key 'w'.*raw data alone is 4294967296")


def test_a_container_that_holds_itself(checkpoint: Path, marker: Path) -> None:
    metadata = genuine_metadata(checkpoint)
    loop: list[Any] = []
    loop.append(loop)
    metadata.planner_data["step"] = loop
    refused(checkpoint, pickle.dumps(metadata), marker, "holds itself")


# --- damaged pickles -------------------------------------------------------------------------


def test_truncated_and_bit_flipped_metadata_never_escapes_as_another_error(
    checkpoint: Path,
) -> None:
    genuine = (checkpoint / ".metadata").read_bytes()
    source = str(checkpoint / ".metadata")
    for end in range(1, len(genuine), max(1, len(genuine) // 97)):
        with pytest.raises(distcp.CheckpointFormatError, match="ckpt"):
            safe_loads(genuine[:end], source=source)
    generator = random.Random(1)
    outcomes = set()
    for _ in range(300):
        damaged = bytearray(genuine)
        damaged[generator.randrange(2, len(damaged))] ^= 1 << generator.randrange(8)
        (checkpoint / ".metadata").write_bytes(bytes(damaged))
        try:
            read_torch_metadata(checkpoint)
            outcomes.add("loaded")
        except (distcp.CheckpointFormatError, distcp.CorruptCheckpointError):
            outcomes.add("refused")
    assert "refused" in outcomes


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../outside.distcp", "/etc/passwd", "sub/../../x.distcp", "..\\x.distcp", "C:x", "", "a//b"],
)
def test_file_names_that_leave_the_checkpoint(checkpoint: Path, marker: Path, name: str) -> None:
    metadata = genuine_metadata(checkpoint)
    for info in metadata.storage_data.values():
        info.relative_path = name
    refused(checkpoint, pickle.dumps(metadata), marker, "not a plain relative path|not a non-empty")


def test_a_symlink_out_of_the_checkpoint(checkpoint: Path, tmp_path: Path, marker: Path) -> None:
    data = checkpoint / "__0_0.distcp"
    outside = tmp_path / "elsewhere.distcp"
    outside.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(outside)
    with pytest.raises(distcp.CheckpointFormatError, match="outside the checkpoint directory"):
        load(checkpoint)
    # a symlink that stays inside is fine
    data.unlink()
    (checkpoint / "real.bin").write_bytes(outside.read_bytes())
    data.symlink_to(checkpoint / "real.bin")
    assert load(checkpoint)["step"] == 3


def test_byte_ranges_outside_the_data_file(checkpoint: Path, marker: Path) -> None:
    size = (checkpoint / "__0_0.distcp").stat().st_size
    metadata = genuine_metadata(checkpoint)
    for info in metadata.storage_data.values():
        info.offset = size + 10
    refused(
        checkpoint, pickle.dumps(metadata), marker, "out-of-bounds", distcp.CorruptCheckpointError
    )
    for info in metadata.storage_data.values():
        info.offset = -1
    refused(checkpoint, pickle.dumps(metadata), marker, "is not two sizes")
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, size + 1
    refused(
        checkpoint, pickle.dumps(metadata), marker, "out-of-bounds", distcp.CorruptCheckpointError
    )


# --- data files ------------------------------------------------------------------------------


def item_range(checkpoint: Path, key: str) -> tuple[int, int]:
    metadata = read_torch_metadata(checkpoint)
    info = next(i for index, i in metadata.storage_data.items() if index.fqn == key)
    return info.offset, info.length


def replace_item(checkpoint: Path, key: str, data: bytes) -> None:
    """Overwrite one item's bytes in its data file, and its length in the metadata."""
    offset, length = item_range(checkpoint, key)
    path = checkpoint / "__0_0.distcp"
    content = path.read_bytes()
    path.write_bytes(content[:offset] + data + content[offset + length :])
    metadata = genuine_metadata(checkpoint)
    shift = len(data) - length
    for info in metadata.storage_data.values():
        if info.offset == offset:
            info.length = len(data)
        elif info.offset > offset:
            info.offset += shift
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


def test_a_byte_value_whose_unpickling_runs_code(checkpoint: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save(Planted(touch(marker)), buffer)
    replace_item(checkpoint, "step", buffer.getvalue())
    with pytest.raises(distcp.PickleNotAllowedError, match=r"'step'.*nothing in it was run"):
        load(checkpoint)
    assert not marker.exists()
    live(lambda: torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), marker)


def test_a_tensor_item_whose_unpickling_runs_code(checkpoint: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save(Planted(touch(marker)), buffer)
    replace_item(checkpoint, "w", buffer.getvalue())
    with pytest.raises(distcp.CorruptCheckpointError, match=r"'w'.*torch\.load failed"):
        load(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["step", "w"])
@pytest.mark.parametrize("damage", ["zeros", "flipped"])
def test_garbage_byte_values_and_tensors(checkpoint: Path, key: str, damage: str) -> None:
    offset, length = item_range(checkpoint, key)
    path = checkpoint / "__0_0.distcp"
    content = bytearray(path.read_bytes())
    if damage == "zeros":
        content[offset : offset + length] = bytes(length)
    else:  # a flipped byte in the archive's zip directory, near the item's end
        content[offset + length - 30] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(distcp.CorruptCheckpointError, match=f"'{key}'.*{path.name}"):
        load(checkpoint)


def test_a_tensor_item_of_another_shape_or_dtype(checkpoint: Path) -> None:
    buffer = io.BytesIO()
    torch.save(torch.arange(7.0), buffer)
    replace_item(checkpoint, "w", buffer.getvalue())
    with pytest.raises(distcp.CorruptCheckpointError, match=r"'w'.*shape \[7\].*shape \[6\]"):
        load(checkpoint)


def test_a_safetensors_blob_is_refused_naming_the_format(checkpoint: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + bytes(24)
    replace_item(checkpoint, "w", blob)
    with pytest.raises(distcp.CorruptCheckpointError, match="SAFETENSORS"):
        load(checkpoint)


def test_the_genuine_checkpoint_loads(checkpoint: Path) -> None:
    state = load(checkpoint)
    assert torch.equal(state["w"], torch.arange(6.0)) and state["step"] == 3
