"""``StateDictOptions``: how ``get_*`` / ``set_*`` state-dict functions behave."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StateDictOptions"]


@dataclass(frozen=True)
class StateDictOptions:
    """Options of :func:`get_state_dict` / :func:`set_state_dict` and their
    model- and optimizer-only variants, with torch DCP's names and meanings.

    Attributes:
        full_state_dict: get: gather every DTensor / ShardedTensor into a full
            plain tensor (one tensor at a time). set: the given state dict holds
            full tensors; each rank keeps its own shard of each.
        cpu_offload: get: move tensors to the CPU. With ``full_state_dict`` only
            rank 0 keeps the result (every other rank gets ``{}``), so the full
            state is held once.
        ignore_frozen_params: get: leave out parameters with
            ``requires_grad=False`` from the model state dict.
        keep_submodule_prefixes: with ``submodules``, keep the submodule's own
            prefix in the keys (``False`` strips it).
        strict: set: every model key must be given and every given key must
            exist in the model (``model.load_state_dict(strict=...)``).
        broadcast_from_rank0: set: only rank 0 holds the (full) state dict; it
            sends one tensor at a time and every rank keeps its own shard.
            Requires ``full_state_dict``.
        flatten_optimizer_state_dict: the optimizer state dict is one flat
            mapping, ``state.<fqn>.<name>`` and ``param_groups.<fqn>.<name>``,
            instead of ``{"state": ..., "param_groups": [...]}``.
        dsd_fqn_modifiers: the name of the module method (DCP's default
            ``_fqn_modifiers``) that returns ``{name: hidden_attribute}``: such
            hidden children are left out of FQNs, as wrapper prefixes are.
    """

    full_state_dict: bool = False
    cpu_offload: bool = False
    ignore_frozen_params: bool = False
    keep_submodule_prefixes: bool = True
    strict: bool = True
    broadcast_from_rank0: bool = False
    flatten_optimizer_state_dict: bool = False
    dsd_fqn_modifiers: str = "_fqn_modifiers"

    def __post_init__(self) -> None:
        if self.broadcast_from_rank0 and not self.full_state_dict:
            raise ValueError(
                "StateDictOptions(broadcast_from_rank0=True) needs full_state_dict=True: rank 0 "
                "broadcasts full tensors"
            )
