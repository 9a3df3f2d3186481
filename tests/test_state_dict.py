"""``distcp.state_dict`` in one process: clean FQNs, param groups matched by FQN,
frozen parameters, parameters without optimizer state, strict key errors, the flat
optimizer form. Also the tiny model, training steps and comparisons that the
multi-rank tests (``test_state_dict_parallel.py``) share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor

import distcp
from bit_patterns import raw
from distcp.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)


class MLP(nn.Module):
    """Two Linear layers (10 and 5 output rows: uneven over 3 or 4 ranks) and a buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5) + seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * self.scale


def batch(step: int) -> torch.Tensor:
    """The same input on every rank (so data parallel averages equal gradients)."""
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + step))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        optimizer.zero_grad()
        model(batch(step)).pow(2).mean().backward()
        optimizer.step()


def adam_groups(
    model: nn.Module, *, reverse: bool = False, lr: float | None = None, adamw: bool = False
) -> Any:
    """Adam (or AdamW) with one param group per layer, each with its own
    hyper-parameters (``lr`` overrides them all, to check that setting restores them)."""
    groups = [
        {"params": list(_layer(model, name).parameters()), "lr": lr or rate, "weight_decay": decay}
        for name, rate, decay in (("up", 0.01, 0.0), ("down", 0.02, 0.1))
    ]
    optimizer = torch.optim.AdamW if adamw else torch.optim.Adam
    return optimizer(groups[::-1] if reverse else groups)


def _layer(model: nn.Module, name: str) -> nn.Module:
    for raw_name, module in model.named_modules():
        if raw_name.split(".")[-1] == name:
            return module
    raise KeyError(name)


def local_copy(value: Any) -> Any:
    """A picklable copy: tensors to plain CPU clones (DTensors must be full already)."""
    if isinstance(value, dict):
        return {key: local_copy(child) for key, child in value.items()}
    if isinstance(value, list):
        return [local_copy(child) for child in value]
    if isinstance(value, DTensor):
        raise TypeError("gather DTensors (full_state_dict=True) before copying")
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return value


def by_group(param_groups: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Param groups keyed by their sorted FQNs, so group order does not matter."""
    return {
        tuple(sorted(group["params"])): {k: v for k, v in group.items() if k != "params"}
        for group in param_groups
    }


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where two nested state dicts differ: keys, types, dtypes, or any bit."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return [f"{path}: keys differ: {sorted(map(str, expected.keys() ^ actual.keys()))}"]
        found: list[str] = []
        for key in expected:
            found += differences(expected[key], actual[key], f"{path}.{key}")
        return found
    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        same = (
            type(expected) is type(actual)
            and expected.dtype == actual.dtype
            and expected.shape == actual.shape
            and raw(expected) == raw(actual)
        )
        return [] if same else [f"{path}: tensors differ"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def same_state(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Differences between two full (model, optimizer) states, param groups by FQN."""
    (model_a, optim_a), (model_b, optim_b) = expected, actual
    return (
        differences(model_a, model_b, "model")
        + differences(optim_a["state"], optim_b["state"], "optim.state")
        + differences(by_group(optim_a["param_groups"]), by_group(optim_b["param_groups"]))
    )


def close(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ beyond float round-off (reduction order differs
    between parallelisms)."""
    assert expected.keys() == actual.keys()
    return [
        key
        for key in expected
        if not torch.allclose(expected[key], actual[key], rtol=1e-5, atol=1e-6)
    ]


# --- one process ---------------------------------------------------------------------------

FULL = StateDictOptions(full_state_dict=True)


def trained(optimizer_factory: Any = adam_groups, steps: int = 2) -> tuple[MLP, Any]:
    model = MLP()
    optimizer = optimizer_factory(model)
    train(model, optimizer, steps)
    return model, optimizer


def full_state(model: nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL)
    return local_copy(model_sd), local_copy(optim_sd)


class CompiledLike(nn.Module):
    """Stands in for torch.compile's OptimizedModule (its child is ``_orig_mod``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)  # type: ignore[no-any-return]


def test_keys_are_clean_fqns_under_wrappers() -> None:
    inner = MLP()
    inner.up = checkpoint_wrapper(inner.up)
    model = CompiledLike(inner)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, 1)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    assert list(model_sd) == ["scale", "up.weight", "up.bias", "down.weight", "down.bias"]
    assert list(optim_sd["state"]) == ["up.weight", "up.bias", "down.weight", "down.bias"]
    assert optim_sd["param_groups"][0]["params"] == list(optim_sd["state"])
    assert model_sd["up.weight"] is not None
    assert model_sd["up.weight"].data_ptr() == inner.up._checkpoint_wrapped_module.weight.data_ptr()
    # and back: set takes the clean keys
    target = CompiledLike(checkpoint_wrapper(MLP(seed=1)))
    assert set_model_state_dict(target, model_sd) == ([], [])


def test_round_trip_through_a_checkpoint_in_one_process(tmp_path: Path) -> None:
    model, optimizer = trained()
    saved = full_state(model, optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    distcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path, no_dist=True)

    fresh = MLP(seed=3)
    fresh_optimizer = adam_groups(fresh, reverse=True, lr=9.0)
    model_sd, optim_sd = get_state_dict(fresh, fresh_optimizer)
    distcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path, no_dist=True)
    set_state_dict(fresh, fresh_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    assert same_state(saved, full_state(fresh, fresh_optimizer)) == []

    train(model, optimizer, 2, first=2)
    train(fresh, fresh_optimizer, 2, first=2)
    assert differences(dict(model.state_dict()), dict(fresh.state_dict())) == []


def test_param_groups_get_their_hyper_parameters_back_by_fqn() -> None:
    model, optimizer = trained()
    _, optim_sd = get_state_dict(model, optimizer)
    assert [group["params"] for group in optim_sd["param_groups"]] == [
        ["up.weight", "up.bias"],
        ["down.weight", "down.bias"],
    ]
    other = adam_groups(model, reverse=True, lr=9.0)  # down first, every lr wrong
    set_optimizer_state_dict(model, other, optim_sd)
    assert [(g["lr"], g["weight_decay"]) for g in other.param_groups] == [(0.02, 0.1), (0.01, 0.0)]
    assert other.state[model.down.weight]["exp_avg"].equal(
        optimizer.state[model.down.weight]["exp_avg"]
    )


def test_a_group_split_differently_is_refused() -> None:
    model, optimizer = trained()
    _, optim_sd = get_state_dict(model, optimizer)
    one_group = torch.optim.Adam(model.parameters())
    with pytest.raises(distcp.CheckpointError, match="different param groups"):
        set_optimizer_state_dict(model, one_group, optim_sd)


def test_a_param_group_missing_from_the_state_dict_names_its_parameters() -> None:
    model, optimizer = trained()
    _, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"] = optim_sd["param_groups"][:1]
    with pytest.raises(distcp.KeyMismatchError, match=r"down\.weight"):
        set_optimizer_state_dict(model, optimizer, optim_sd)


def test_frozen_parameters_can_be_left_out() -> None:
    model = MLP()
    model.up.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train(model, optimizer, 2)
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    assert list(model_sd) == ["scale", "down.weight", "down.bias"]
    assert list(optim_sd["state"]) == ["down.weight", "down.bias"]

    fresh = MLP(seed=1)
    fresh.up.requires_grad_(False)
    assert set_model_state_dict(fresh, model_sd, options=options) == ([], [])
    assert fresh.down.weight.equal(model.down.weight)
    assert not fresh.up.weight.equal(model.up.weight)  # frozen: left alone
    with pytest.raises(distcp.KeyMismatchError, match=r"up\.weight"):
        set_model_state_dict(fresh, model_sd)  # strict, frozen keys expected


def test_parameters_without_state_stay_without_state() -> None:
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(batch(0)).sum().backward()
    model.up.weight.grad = None  # as if unused this step: Adam makes no state for it
    optimizer.step()
    _, optim_sd = get_state_dict(model, optimizer)
    assert "up.weight" not in optim_sd["state"]
    assert optim_sd["param_groups"][0]["params"][0] == "up.weight"

    fresh_optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    set_optimizer_state_dict(model, fresh_optimizer, optim_sd)
    assert model.up.weight not in fresh_optimizer.state
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1
    assert differences(optim_sd, get_optimizer_state_dict(model, fresh_optimizer)) == []


def test_a_fresh_optimizer_gets_placeholder_state_without_changing_the_model() -> None:
    model = MLP()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    assert list(optim_sd["state"]) == ["up.weight", "up.bias", "down.weight", "down.bias"]
    assert optim_sd["state"]["up.weight"]["exp_avg"].abs().sum() == 0
    assert optim_sd["param_groups"][0]["lr"] == 0.1
    assert differences(before, dict(model.state_dict())) == []
    assert all(p.grad is None for p in model.parameters())


def test_strict_key_and_shape_errors_name_the_keys() -> None:
    model = MLP()
    model_sd = get_model_state_dict(model)
    del model_sd["up.bias"]
    model_sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(distcp.KeyMismatchError, match=r"'up\.bias'.*not expected: 'extra\.weight'"):
        set_model_state_dict(MLP(), model_sd)
    loose = set_model_state_dict(MLP(), model_sd, options=StateDictOptions(strict=False))
    assert loose.missing_keys == ["up.bias"]
    assert loose.unexpected_keys == ["extra.weight"]

    wrong = get_model_state_dict(model)
    wrong["down.weight"] = torch.zeros(5, 11)
    with pytest.raises(distcp.ShapeMismatchError, match=r"'down\.weight'.*\[5, 11\]"):
        set_model_state_dict(MLP(), wrong)


def test_flat_optimizer_state_dict_round_trips() -> None:
    model, optimizer = trained()
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    flat = get_optimizer_state_dict(model, optimizer, options=options)
    assert "state.down.weight.exp_avg" in flat
    assert flat["param_groups.down.bias.weight_decay"] == 0.1
    nested = get_optimizer_state_dict(model, optimizer)

    fresh_optimizer = adam_groups(model, reverse=True, lr=9.0)
    set_optimizer_state_dict(model, fresh_optimizer, flat, options=options)
    assert same_state(({}, nested), ({}, get_optimizer_state_dict(model, fresh_optimizer))) == []


def test_submodules_select_entries_and_prefixes() -> None:
    model, optimizer = trained()
    kept = get_model_state_dict(model, submodules={model.down})
    assert list(kept) == ["down.weight", "down.bias"]
    stripped = get_model_state_dict(
        model, submodules={model.down}, options=StateDictOptions(keep_submodule_prefixes=False)
    )
    assert list(stripped) == ["weight", "bias"]
    optim_sd = get_optimizer_state_dict(model, optimizer, submodules={model.down})
    assert list(optim_sd["state"]) == ["down.weight", "down.bias"]
    assert [group["params"] for group in optim_sd["param_groups"]] == [["down.weight", "down.bias"]]


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="full_state_dict=True"):
        StateDictOptions(broadcast_from_rank0=True)


def test_full_state_dict_in_one_process_is_the_plain_state() -> None:
    model, optimizer = trained()
    model_sd, optim_sd = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    assert differences(dict(model.state_dict()), model_sd) == []
    assert optim_sd["state"]["up.bias"]["step"] == 2


def test_several_optimizers_share_one_state_dict() -> None:
    model = MLP()
    optimizers = [
        torch.optim.SGD(model.up.parameters(), lr=0.1, momentum=0.9),
        torch.optim.Adam(model.down.parameters(), lr=0.01),
    ]
    for optimizer in optimizers:
        train(model, optimizer, 1)
    _, optim_sd = get_state_dict(model, optimizers)
    assert list(optim_sd["state"]) == ["up.weight", "up.bias", "down.weight", "down.bias"]
    assert [g["lr"] for g in optim_sd["param_groups"]] == [0.1, 0.01]

    fresh = [
        torch.optim.Adam(model.down.parameters(), lr=5.0),
        torch.optim.SGD(model.up.parameters(), lr=5.0, momentum=0.9),
    ]
    set_optimizer_state_dict(model, fresh, optim_sd)
    assert [o.param_groups[0]["lr"] for o in fresh] == [0.01, 0.1]
    assert same_state(({}, optim_sd), ({}, get_optimizer_state_dict(model, fresh))) == []
