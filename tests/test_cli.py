"""The ``distcp`` command line, run as the installed console script in a
subprocess, on real checkpoints: output checked, ``--json`` parsed, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.bit_patterns import random_tensor, raw
from tests.cli_ranks import full_weight, load_safetensors_sharded, save_sharded

import distcp
from distcp.dtypes import supported_dtypes

SCRIPT = Path(sys.executable).with_name("distcp")


def run(*args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == expect, (done.returncode, done.stdout, done.stderr)
    return done


def run_json(*args: str | Path, expect: int = 0) -> Any:
    return json.loads(run(*args, "--json", expect=expect).stdout)


def value_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        f"t.{str(dtype).removeprefix('torch.')}": random_tensor((6, 5), dtype, n)
        for n, dtype in enumerate(supported_dtypes())
    }
    state["meta"] = {"step": 7, "name": "run", "lr": [0.1, 0.01]}
    return state


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, rank_pool: Callable[[int], Any]) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "step-100"
    rank_pool(2).run(save_sharded, str(path))
    return path


def test_the_console_script_and_the_module_both_run() -> None:
    assert "inspect" in run("--help").stdout
    for command in ("inspect", "verify", "diff", "ls", "convert"):
        assert "Examples:" in run(command, "--help").stdout, command
    done = subprocess.run(
        [sys.executable, "-m", "distcp", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "convert" in done.stdout


def test_inspect_shows_layouts_and_values(
    sharded: Path, tmp_path: Path, rank_pool: Callable[[int], Any]
) -> None:
    report = run_json("inspect", sharded)
    assert report["format"] == "distcp" and report["world_size"] == 2
    tensors = {t["key"]: t for t in report["tensors"]}
    assert tensors["model.w"] == {
        "key": "model.w",
        "dtype": "float32",
        "shape": [16, 12],
        "bytes": 16 * 12 * 4,
        "chunks": 2,
        "layout": "Shard(0) over 2",
    }
    assert tensors["model.bias"]["layout"] == "whole"
    assert report["values"] == [{"key": "step", "type": "int", "repr": "42"}]
    assert report["totals"]["tensor_bytes"] == 16 * 12 * 4 + 12 * 2
    text = run("inspect", sharded).stdout
    assert "Shard(0) over 2" in text and "step: int = 42" in text
    four = tmp_path / "four"
    rank_pool(4).run(save_sharded, str(four))
    layouts = {t["key"]: t["layout"] for t in run_json("inspect", four)["tensors"]}
    assert layouts["model.w"] == "Shard(0) over 4"
    only = run_json("inspect", sharded, "--keys", "model.b*")
    assert [t["key"] for t in only["tensors"]] == ["model.bias"] and only["values"] == []


def test_inspect_lists_every_dtype(tmp_path: Path) -> None:
    distcp.save(value_state(), checkpoint_id=tmp_path / "c", no_dist=True)
    dtypes = {t["key"]: t["dtype"] for t in run_json("inspect", tmp_path / "c")["tensors"]}
    assert len(dtypes) == len(supported_dtypes())
    assert all(key == f"t.{dtype}" for key, dtype in dtypes.items())


def test_verify_passes_then_names_the_damaged_item(sharded: Path, tmp_path: Path) -> None:
    report = run_json("verify", sharded)
    assert report["ok"] and report["damaged"] == [] and report["checked_items"] == 4
    damaged = tmp_path / "damaged"
    distcp.convert.convert(sharded, damaged, to="distcp")
    metadata = distcp.FileSystemReader(damaged).read_metadata()
    info = next(i for index, i in metadata.storage_data.items() if index.fqn == "model.w")
    data = bytearray((damaged / info.relative_path).read_bytes())
    data[info.offset + 100] ^= 1
    (damaged / info.relative_path).write_bytes(bytes(data))
    report = run_json("verify", damaged, expect=1)
    assert not report["ok"]
    assert report["damaged"] == [
        {
            "key": "model.w",
            "chunk": [0, 0],
            "file": info.relative_path,
            "offset": info.offset,
            "problem": "checksum mismatch",
        }
    ]
    text = run("verify", damaged, expect=1).stdout
    assert f"DAMAGED key 'model.w' chunk [0, 0] in {info.relative_path} at offset" in text


def test_verify_a_torch_dcp_checkpoint_checks_what_it_can(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as torch_dcp

    torch_dcp.save({"w": torch.ones(64, 64)}, checkpoint_id=tmp_path / "t", no_dist=True)
    report = run_json("verify", tmp_path / "t")
    assert report["ok"] and "no checksums" in report["unchecked"]
    data_file = next(p for p in (tmp_path / "t").iterdir() if p.suffix == ".distcp")
    data_file.write_bytes(data_file.read_bytes()[:100])
    report = run_json("verify", tmp_path / "t", expect=1)
    (damage,) = report["damaged"]
    assert Path(damage["file"]).name == data_file.name and damage["offset"] == 100
    assert "'w'" in damage["problem"]


def test_diff_exits_like_diff(sharded: Path, tmp_path: Path) -> None:
    same = run_json("diff", sharded, sharded)
    assert same["same"] and same["identical_by_checksum"] == 2 and same["identical"] == 3
    state = {
        "model": {"w": full_weight(), "bias": torch.ones(12, dtype=torch.bfloat16)},
        "step": 42,
    }
    state["model"]["w"][3, 4] += 0.5
    distcp.save(state, checkpoint_id=tmp_path / "other", no_dist=True)
    report = run_json("diff", sharded, tmp_path / "other", expect=1)
    (change,) = report["changed"]
    assert change["key"] == "model.w" and change["max_abs_diff"] == pytest.approx(0.5)
    assert change["elements_differing"] == 1
    assert run_json("diff", sharded, tmp_path / "other", "--atol", "0.6")["same"]
    state["extra"] = torch.zeros(2)
    state["step"] = 43
    distcp.save(state, checkpoint_id=tmp_path / "more", no_dist=True)
    report = run_json("diff", sharded, tmp_path / "more", "--atol", "1", expect=1)
    assert report["only_in_b"] == ["extra"]
    assert [c["key"] for c in report["changed"]] == ["step"]
    assert "only in B: extra" in run("diff", sharded, tmp_path / "more", expect=1).stdout


def test_ls_tells_committed_from_incomplete(sharded: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as torch_dcp

    root = tmp_path / "run"
    distcp.save({"w": torch.ones(3)}, checkpoint_id=root / "step-20", no_dist=True)
    distcp.save({"w": torch.ones(300)}, checkpoint_id=root / "step-3", no_dist=True)
    torch_dcp.save({"w": torch.ones(3)}, checkpoint_id=root / "step-5", no_dist=True)
    (root / "step-40").mkdir()
    (root / "step-40" / "data-0123456789abcdef-00000-000.distcp").write_bytes(b"partial")
    (root / "notes").mkdir()
    found = run_json("ls", root)
    assert [(f["step"], f["state"]) for f in found] == [
        (3, "committed"),
        (5, "torch-dcp"),
        (20, "committed"),
        (40, "incomplete"),
    ]
    assert found[0]["bytes"] > found[2]["bytes"] > 0 and all(f["age_s"] >= 0 for f in found)
    assert "incomplete" in run("ls", root).stdout


def test_round_trips_are_bit_exact(tmp_path: Path) -> None:
    state = value_state()
    distcp.save(state, checkpoint_id=tmp_path / "src", no_dist=True)
    # distcp -> torch.save -> distcp: everything, values included
    run("convert", tmp_path / "src", tmp_path / "m.pt", "--to", "torch")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True, mmap=True)
    assert all(raw(loaded[k]) == raw(v) for k, v in state.items() if isinstance(v, torch.Tensor))
    assert loaded["meta"] == state["meta"]
    run("convert", tmp_path / "m.pt", tmp_path / "back", "--to", "distcp")
    assert run_json("diff", tmp_path / "src", tmp_path / "back")["same"]
    # distcp -> safetensors -> distcp: tensors (every dtype safetensors has)
    tensors = [f"t.{d}" for d in ("float32", "bfloat16", "float16", "int64", "uint8", "bool")]
    keys = [arg for key in tensors for arg in ("--keys", key)]
    run("convert", tmp_path / "src", tmp_path / "hf", "--to", "safetensors", *keys)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(exported) == sorted(tensors)
    assert all(raw(exported[k]) == raw(state[k]) for k in tensors)
    run("convert", tmp_path / "hf", tmp_path / "from_hf", "--to", "distcp")
    fresh = {k: torch.zeros_like(state[k]) for k in tensors}
    distcp.load(fresh, checkpoint_id=tmp_path / "from_hf", no_dist=True)
    assert all(raw(fresh[k]) == raw(state[k]) for k in tensors)
    # torch DCP -> distcp, and distcp -> torch DCP's own format
    import torch.distributed.checkpoint as torch_dcp

    run("convert", tmp_path / "src", tmp_path / "dcp", "--to", "dcp")
    fresh_dcp = {k: torch.zeros_like(state[k]) for k in tensors}
    torch_dcp.load(fresh_dcp, checkpoint_id=tmp_path / "dcp", no_dist=True)
    assert all(raw(fresh_dcp[k]) == raw(state[k]) for k in tensors)
    run("convert", tmp_path / "dcp", tmp_path / "from_dcp", "--to", "distcp")
    assert run_json("diff", tmp_path / "src", tmp_path / "from_dcp")["same"]


def test_safetensors_export_is_sharded_cast_and_renamed(tmp_path: Path) -> None:
    state = {"model": {f"layer{n}.weight": torch.randn(256, 256) for n in range(4)}, "step": 1}
    distcp.save(state, checkpoint_id=tmp_path / "src", no_dist=True)
    report = run_json(
        "convert", tmp_path / "src", tmp_path / "hf", "--to", "safetensors",
        "--dtype", "bf16", "--strip-prefix", "model.", "--max-shard-size", "200KB",
    )  # fmt: skip
    assert report["skipped_values"] == ["step"] and report["tensors"] == 4
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 256 * 256 * 2
    assert sorted(index["weight_map"]) == [f"layer{n}.weight" for n in range(4)]
    files = sorted({*index["weight_map"].values()})
    assert files == [f"model-0000{n}-of-00004.safetensors" for n in range(1, 5)]
    from safetensors.torch import load_file

    for key, name in index["weight_map"].items():
        tensor = load_file(tmp_path / "hf" / name)[key]
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state["model"][key].to(torch.bfloat16))


def test_bad_input_is_exit_2_with_a_message(sharded: Path, tmp_path: Path) -> None:
    done = run("inspect", tmp_path / "nothing", expect=2)
    assert "does not exist" in done.stderr
    (tmp_path / "empty").mkdir()
    assert "no committed checkpoint" in run("verify", tmp_path / "empty", expect=2).stderr
    assert "matches no key" in run("inspect", sharded, "--keys", "zz*", expect=2).stderr
    (tmp_path / "out.pt").write_bytes(b"old")
    done = run("convert", sharded, tmp_path / "out.pt", "--to", "torch", expect=2)
    assert "--overwrite" in done.stderr and (tmp_path / "out.pt").read_bytes() == b"old"
    run("convert", sharded, tmp_path / "out.pt", "--to", "torch", "--overwrite")
    assert torch.load(tmp_path / "out.pt", weights_only=True)["step"] == 42
    assert (
        "bf16"
        in run(
            "convert", sharded, tmp_path / "x", "--to", "torch", "--dtype", "f7", expect=2
        ).stderr
    )


def test_a_safetensors_folder_loads_resharded_reading_only_what_each_rank_needs(
    sharded: Path, tmp_path: Path, rank_pool: Callable[[int], Any]
) -> None:
    folder = tmp_path / "hf"
    run("convert", sharded, folder, "--to", "safetensors", "--strip-prefix", "model.",
        "--max-shard-size", "400B")  # fmt: skip
    assert (folder / "model.safetensors.index.json").exists()
    counts = rank_pool(2).run(load_safetensors_sharded, str(folder))
    for count in counts:  # half of w's columns and the whole bias, nothing more
        assert count["needed"] == count["read"] == 16 * 6 * 4 + 12 * 2


def test_export_opens_with_transformers_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    distcp.save({"model": model.state_dict()}, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    run("convert", tmp_path / "ckpt", tmp_path / "hf", "--to", "safetensors",
        "--strip-prefix", "model.", "--max-shard-size", "64KB")  # fmt: skip
    config.save_pretrained(tmp_path / "hf")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
