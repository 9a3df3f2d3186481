"""Strict and partial key matching, shape mismatches, and partial loads that
read only the requested bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distcp


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    state = {
        "model": {"w": torch.randn(64, 64), "b": torch.randn(64)},
        "big": torch.randn(256, 256),
        "step": 7,
    }
    distcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    return tmp_path


def test_missing_keys_raise_naming_every_one(checkpoint: Path) -> None:
    target = {"model": {"w": torch.empty(64, 64), "extra": torch.empty(2)}, "also_missing": 1}
    missing = r"Missing key in checkpoint.*'also_missing'.*'model\.extra'"
    with pytest.raises(distcp.KeyMismatchError, match=missing) as info:
        distcp.load(target, checkpoint_id=checkpoint, no_dist=True)
    assert info.value.missing == ["also_missing", "model.extra"]  # sorted keys, as torch DCP
    assert "allow_partial_load=True" in str(info.value)


def test_partial_load_skips_missing_keys(checkpoint: Path) -> None:
    target = {"model": {"w": torch.zeros(64, 64), "extra": torch.full((2,), 5.0)}}
    distcp.load(
        target,
        checkpoint_id=checkpoint,
        no_dist=True,
        planner=distcp.DefaultLoadPlanner(allow_partial_load=True),
    )
    assert target["model"]["w"].abs().sum() > 0
    assert torch.equal(target["model"]["extra"], torch.full((2,), 5.0))


def test_shape_mismatch_names_the_key_and_both_shapes(checkpoint: Path) -> None:
    target = {"model": {"w": torch.empty(64, 32)}}
    with pytest.raises(distcp.ShapeMismatchError, match=r"'model\.w'.*\[64, 64\].*\[64, 32\]"):
        distcp.load(target, checkpoint_id=checkpoint, no_dist=True)


def test_tensor_requested_where_a_value_was_saved(checkpoint: Path) -> None:
    target = {"step": torch.zeros(1)}
    distcp.load(target, checkpoint_id=checkpoint, no_dist=True)
    assert target["step"] == 7  # the saved value replaces the placeholder


def test_loading_a_subset_reads_only_those_bytes(checkpoint: Path) -> None:
    reader = distcp.FileSystemReader(checkpoint)
    target = {"model": {"b": torch.empty(64)}}
    distcp.load(target, storage_reader=reader, no_dist=True)
    needed = 64 * 4
    assert reader.report.bytes_needed == needed
    assert reader.report.bytes_read == needed
    assert reader.report.bytes_verified == needed


def test_unexpected_keys_in_the_checkpoint_are_not_an_error(checkpoint: Path) -> None:
    target = {"step": 0}
    distcp.load(target, checkpoint_id=checkpoint, no_dist=True)
    assert target == {"step": 7}
