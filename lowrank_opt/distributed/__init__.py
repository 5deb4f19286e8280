"""Distributed state handling on ``torch.distributed``: three modes, one wrapper.

* :class:`Replicated` (default; a single process or DDP): every rank computes the same step.
* :class:`PairSharded` (ZeRO-1 style): each LoRA pair is owned, whole, by one rank.
* :class:`FSDP2` (chosen automatically when the factors are DTensors from ``fully_shard``; HSDP
  meshes too): each pair is stepped by one rank of the shard group, on shards gathered to it.

Pass one as ``LowRankWrapper(..., distributed=...)``. Checkpoints go through
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` and ``torch.distributed.checkpoint.save`` / ``load`` in every
mode; :mod:`lowrank_opt.distributed.checkpoint` wraps them crash-safely (``save`` /
``load_latest``). See ``docs/distributed.md`` for memory and communication costs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from ..layout import OWN_KEYS, hidden_wrapper_keys
from ..pairs import LoRAPair
from . import checkpoint
from .fsdp import FSDP2
from .sharded import PairSharded, assign_pairs, pair_costs
from .strategy import (
    DistributedStrategy,
    Materialised,
    Replicated,
    agree_flags,
    check_ranks_agree,
    comm_device,
    owner_state_dict_hooks,
    refuse_unsupported_wrappers,
    state_bytes,
)

__all__ = [
    "DistributedStrategy",
    "FSDP2",
    "Materialised",
    "PairSharded",
    "Replicated",
    "agree_flags",
    "assign_pairs",
    "checkpoint",
    "check_ranks_agree",
    "comm_device",
    "owner_state_dict_hooks",
    "default_strategy",
    "init_base_state",
    "pair_costs",
    "refuse_unsupported_wrappers",
    "state_bytes",
]


def default_strategy(pairs: Iterable[LoRAPair]) -> DistributedStrategy:
    """:class:`FSDP2` when any factor is a DTensor, else :class:`Replicated`."""
    if any(isinstance(f, DTensor) for pair in pairs for f in (pair.a, pair.b)):
        return FSDP2()
    return Replicated()


@torch.no_grad()
def init_base_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the base optimizer's state for trainable parameters that have none yet.

    The wrapper creates its rules' state eagerly, but the base optimizer creates the state of
    other parameters (heads, norms), and of the factors under a rule that delegates to its
    ``step()`` (the generic rule), at their first step. A checkpoint is loaded into the state dict
    of a freshly built optimizer, so those entries must exist first or DCP has nowhere to load
    them (and ``strict=True`` refuses): call this before ``get_optimizer_state_dict`` when
    resuming. It runs the base optimizer once with zero gradients and ``lr = 0`` on those
    parameters only (what ``torch.distributed.checkpoint`` does for an optimizer with no state at
    all); the load then overwrites the values. ``optimizer`` is a
    :class:`~lowrank_opt.LowRankWrapper` or a plain optimizer.
    """
    wrapped = isinstance(getattr(optimizer, "base", None), torch.optim.Optimizer) and hasattr(optimizer, "pairs")
    base: torch.optim.Optimizer = optimizer.base if wrapped else optimizer  # type: ignore[attr-defined]
    params = [p for group in base.param_groups for p in group["params"]]
    missing = {p for p in params if p.requires_grad and not base.state.get(p)}
    delegated: list[dict[str, Any]] = []
    if wrapped:
        wrapper: Any = optimizer
        for i, pair in enumerate(wrapper.pairs):
            for factor in (pair.a, pair.b):
                missing.discard(factor)
                state = base.state.get(factor, {})
                if wrapper.rule.uses_base_step and wrapper.distributed.owns(i) and set(state) <= set(OWN_KEYS):
                    missing.add(factor)
                    delegated.append(base.state[factor])
    if not missing:
        return
    stashed: dict[Tensor, Tensor | None] = {p: p.grad for p in params}
    lrs = [group["lr"] for group in base.param_groups]
    try:
        for p in stashed:
            p.grad = torch.zeros_like(p) if p in missing else None
        for group in base.param_groups:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
        with hidden_wrapper_keys(delegated):  # the base initialises empty state only
            base.step()
    finally:
        for group, lr in zip(base.param_groups, lrs):
            group["lr"] = lr
        for p, grad in stashed.items():
            p.grad = grad
    # The wrapper keeps a pair's statistics whole on the rank that steps it (also under FSDP2);
    # the load overwrites these placeholders, so plain zeros of the whole shape need no collective.
    for entry in delegated:
        for key, value in entry.items():
            if isinstance(value, DTensor):
                entry[key] = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
