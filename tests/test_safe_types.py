"""The safe-types registry (``distcp.serialization``): user dataclasses, enums,
datetimes and paths saved and loaded without pickle, only when registered on
both sides, rebuilt without running their code."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import pathlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

import distcp
from distcp.errors import CheckpointFormatError, UnsupportedValueError
from distcp.serialization import (
    add_safe_types,
    clear_safe_types,
    get_safe_types,
    safe_types,
    type_name,
)
from distcp.value_codec import EXT_PICKLE, EXT_SAFE_TYPE, decode_value, encode_value


class Phase(enum.Enum):
    WARMUP = "warmup"
    DECAY = "decay"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Schedule:
    phase: Phase
    steps: tuple[int, ...]


@dataclasses.dataclass
class RunConfig:
    name: str
    lr: float
    schedule: Schedule
    started: datetime.datetime
    budget: datetime.timedelta
    out: pathlib.Path
    table: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    seen: int = dataclasses.field(default=0, init=False)


ALL_TYPES: list[type] = [
    Phase, Priority, Schedule, RunConfig, datetime.datetime, datetime.date,
    datetime.time, datetime.timedelta, pathlib.PosixPath, pathlib.PurePosixPath,
]  # fmt: skip


def sample_config() -> RunConfig:
    config = RunConfig(
        name="llama-tiny",
        lr=3e-4,
        schedule=Schedule(Phase.DECAY, (100, 200)),
        started=datetime.datetime(2026, 12, 7, 1, 2, 3, 456, tzinfo=datetime.timezone.utc),
        budget=datetime.timedelta(days=2, seconds=5, microseconds=7),
        out=pathlib.Path("/runs/llama"),
        table={3: torch.arange(4, dtype=torch.int16)},
    )
    config.seen = 17
    return config


def assert_same_config(expected: RunConfig, actual: object) -> None:
    assert type(actual) is RunConfig
    assert type(actual.schedule) is Schedule and type(actual.schedule.phase) is Phase
    assert type(actual.out) is type(expected.out)
    table = actual.table
    assert list(table) == [3] and torch.equal(table[3], expected.table[3])
    assert table[3].dtype == torch.int16
    assert dataclasses.replace(actual, table={}) == dataclasses.replace(expected, table={})
    assert actual.seen == 17  # an init=False field is saved too


def roundtrip(value: object) -> object:
    return decode_value(encode_value(value, key="k"), key="k")


def test_registered_types_round_trip_with_their_types() -> None:
    with safe_types(ALL_TYPES):
        assert_same_config(sample_config(), roundtrip(sample_config()))
        for value in [
            Phase.WARMUP,
            Priority.HIGH,  # stays an IntEnum, not the int 2
            datetime.date(2026, 1, 31),
            datetime.time(23, 59, 1, 5),
            datetime.datetime(2026, 12, 7, 1, 2, 3, tzinfo=datetime.timezone(
                datetime.timedelta(hours=-5))),
            datetime.timedelta(days=-1, microseconds=1),
            pathlib.PurePosixPath("a/b.txt"),
            {Phase.DECAY: [Priority.LOW, datetime.date(2000, 1, 1)]},  # enum keys too
        ]:  # fmt: skip
            back = roundtrip(value)
            assert back == value and type(back) is type(value), value
        assert type(roundtrip(Priority.HIGH)) is Priority


def test_a_registered_type_is_encoded_without_pickle() -> None:
    with safe_types([Phase]):
        data = encode_value({"p": Phase.DECAY}, key="k", allow_pickle=True)
    tree = msgpack.unpackb(data, strict_map_key=False)
    assert isinstance(tree["p"], msgpack.ExtType) and tree["p"].code == EXT_SAFE_TYPE
    assert msgpack.unpackb(tree["p"].data) == [type_name(Phase), "enum", "DECAY"]


def test_save_and_load_a_checkpoint_with_user_types(tmp_path: Path) -> None:
    state = {"config": sample_config(), "w": torch.ones(3)}
    with safe_types(ALL_TYPES):
        distcp.save(state, checkpoint_id=tmp_path, no_dist=True)
        loaded: dict[str, Any] = {"config": None, "w": torch.zeros(3)}
        distcp.load(loaded, checkpoint_id=tmp_path, no_dist=True)
    assert_same_config(state["config"], loaded["config"])
    assert torch.equal(loaded["w"], state["w"])


def test_an_unregistered_type_is_refused_at_save_naming_the_key_and_the_fix(
    tmp_path: Path,
) -> None:
    with pytest.raises(UnsupportedValueError, match=r"'train.phase'.*add_safe_types"):
        distcp.save({"train": {"phase": Phase.WARMUP}}, checkpoint_id=tmp_path, no_dist=True)
    assert not [p for p in tmp_path.iterdir() if "metadata" in p.name or p.suffix == ".distcp"]


def test_a_type_unregistered_at_load_is_refused_naming_the_key_and_the_type(
    tmp_path: Path,
) -> None:
    with safe_types([Phase]):
        distcp.save({"phase": Phase.WARMUP}, checkpoint_id=tmp_path, no_dist=True)
    with pytest.raises(UnsupportedValueError, match=r"'phase'.*Phase.*add_safe_types"):
        distcp.load({"phase": None}, checkpoint_id=tmp_path, no_dist=True)


def test_a_subclass_of_a_registered_type_is_a_type_of_its_own() -> None:
    @dataclasses.dataclass
    class Base:
        x: int

    @dataclasses.dataclass
    class Derived(Base):
        y: int = 0

    with safe_types([Base]), pytest.raises(UnsupportedValueError, match="Derived"):
        encode_value(Derived(1), key="k")
    with safe_types([Base]):
        data = encode_value(Base(1), key="k")
    # Another class under the saved name, of another kind, is refused too.
    with safe_types([Phase]), pytest.raises(UnsupportedValueError, match="not registered"):
        decode_value(data, key="k")


class Alarm:
    """A marker of code that ran: loading must never call a registered
    dataclass's ``__init__`` or ``__post_init__``."""

    calls: list[str] = []


@dataclasses.dataclass
class Guarded:
    value: int

    def __post_init__(self) -> None:
        Alarm.calls.append("post_init")


def test_loading_runs_no_code_of_the_registered_class() -> None:
    with safe_types([Guarded]):
        data = encode_value(Guarded(5), key="k")
        Alarm.calls.clear()
        back = decode_value(data, key="k")
    assert Alarm.calls == [] and type(back) is Guarded and back.value == 5


def forged(name: str, kind: str, data: object) -> bytes:
    inner = msgpack.packb([name, kind, data], use_bin_type=True)
    return msgpack.packb(msgpack.ExtType(EXT_SAFE_TYPE, inner), use_bin_type=True)


@pytest.mark.parametrize(
    "name, kind, data, problem",
    [
        (type_name(Guarded), "dataclass", {"value": 1, "extra": 2}, "fields"),
        (type_name(Guarded), "dataclass", {}, "fields"),
        (type_name(Guarded), "dataclass", [1], "fields"),
        (type_name(Phase), "enum", "NOT_A_MEMBER", "NOT_A_MEMBER"),
        (type_name(Phase), "enum", 1, "name"),
        (type_name(datetime.date), "datetime", "yesterday", "datetime"),
        (type_name(datetime.timedelta), "datetime", [1, 2], "timedelta"),
        (type_name(datetime.timedelta), "datetime", "1 day", "timedelta"),
        (type_name(pathlib.PurePosixPath), "path", 5, "text"),
    ],
)
def test_forged_payloads_are_format_errors(name: str, kind: str, data: Any, problem: str) -> None:
    registered = [Guarded, Phase, datetime.date, datetime.timedelta, pathlib.PurePosixPath]
    with safe_types(registered), pytest.raises(CheckpointFormatError, match=problem):
        decode_value(forged(name, kind, data), key="k")
    assert Alarm.calls == []


@pytest.mark.parametrize(
    "name", ["os:system", "builtins:eval", "subprocess:Popen", type_name(Guarded)]
)
def test_a_name_is_only_looked_up_never_imported(name: str) -> None:
    with pytest.raises(UnsupportedValueError, match="not registered"):
        decode_value(forged(name, "dataclass", {"value": 1}), key="k")


def test_only_types_the_registry_can_encode_are_accepted() -> None:
    class Plain:
        pass

    for wrong in (Plain, int, dict, torch.Tensor):
        with pytest.raises(TypeError, match="cannot be a safe type"):
            add_safe_types([wrong])
    assert Plain not in get_safe_types()


def test_the_registry_is_scoped_and_can_be_cleared() -> None:
    before = get_safe_types()
    with safe_types([Phase]):
        assert Phase in get_safe_types()
    assert get_safe_types() == before
    add_safe_types([Priority])
    try:
        assert Priority in get_safe_types()
    finally:
        clear_safe_types()
    assert get_safe_types() == []


def test_unregistered_types_still_pickle_with_the_opt_in() -> None:
    data = encode_value(Phase.DECAY, key="k", allow_pickle=True)
    assert msgpack.unpackb(data).code == EXT_PICKLE
    assert decode_value(data, key="k", allow_pickle=True) is Phase.DECAY
