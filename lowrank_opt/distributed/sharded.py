"""Pair-sharded mode (ZeRO-1 style): each pair is owned, whole, by one rank.

Only the owner allocates the pair's statistics and computes its step; the factors that moved are
then broadcast from their owners in buckets. Gradients must already be equal on every rank (DDP,
or an all-reduce of your own), as for ZeRO-1. Splitting a pair across ranks would split its
``r x r`` algebra (Grams, transports, per-column blocks), which is why this mode does not build on
``ZeroRedundancyOptimizer``.

Parameters that are not LoRA factors are *replicated*: every rank steps them with the base
optimizer and keeps their state. In LoRA fine-tuning they are few (heads, norms, biases), and
keeping them everywhere lets every rank's state dict name every trainable parameter, so
``set_optimizer_state_dict(..., strict=True)`` works in this mode too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..engine import finite_flags
from ..linalg import compute_dtype
from ..pairs import LoRAPair
from ..rule import CalibrationRule, Context, Switches
from ..views import build_view
from .strategy import DistributedStrategy, agree_flags, check_ranks_agree, fill_buckets, owner_state_dict_hooks

__all__ = ["PairSharded", "assign_pairs", "pair_costs"]


def assign_pairs(state_bytes: Sequence[float], step_costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of every pair: balanced, deterministic, the same on every rank.

    A pair's load is its share of all state plus its share of all step work,
    ``load_i = state_i / sum(state) + cost_i / sum(cost)``. Pairs go heaviest first (ties: lower
    index first) to the least-loaded rank (ties: lower rank), the longest-processing-time rule,
    whose largest load is within 4/3 of the best possible.
    """
    if len(state_bytes) != len(step_costs):
        raise ValueError(f"state_bytes has {len(state_bytes)} entries, step_costs {len(step_costs)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    total_state, total_cost = sum(state_bytes) or 1.0, sum(step_costs) or 1.0
    loads = [s / total_state + c / total_cost for s, c in zip(state_bytes, step_costs)]
    owners = [0] * len(loads)
    rank_load = [0.0] * world_size
    for index in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        rank = min(range(world_size), key=lambda j: (rank_load[j], j))
        owners[index] = rank
        rank_load[rank] += loads[index]
    return owners


def pair_costs(
    pairs: Sequence[LoRAPair], rule: CalibrationRule, groups: Mapping[Tensor, Mapping[str, Any]]
) -> tuple[list[int], list[float]]:
    """State bytes and step work of every pair.

    State bytes are the rule's own :meth:`~lowrank_opt.CalibrationRule.init_state`, evaluated on
    the ``meta`` device (shapes only, nothing allocated); a rule that lets the base optimizer keep
    its state is counted as two buffers the size of each factor (Adam-like). Step work is
    ``m n r``, the order of every rule's full-space reconstruction.
    """
    state_bytes, step_costs = [], []
    for pair in pairs:
        a = pair.matrix_a(pair.a.detach()).to("meta", compute_dtype(pair.a.dtype))[None]
        b = pair.matrix_b(pair.b.detach()).to("meta", compute_dtype(pair.a.dtype))[None]
        scale = torch.ones(1, 1, 1, dtype=a.dtype, device="meta")
        total = 0
        for side, factor in (("a", pair.a), ("b", pair.b)):
            if rule.uses_base_step:
                total += 2 * factor.numel() * 4
            else:
                ctx = Context.of(groups[factor], torch.ones(1, dtype=a.dtype, device="meta"), Switches())
                state = rule.init_state(build_view(side, [pair], a, b, scale), ctx)  # type: ignore[arg-type]
                total += sum(t.numel() * t.element_size() for t in state.values())
        m, n = pair.full_shape
        state_bytes.append(total)
        step_costs.append(float(m * n * pair.rank))
    return state_bytes, step_costs


class PairSharded(DistributedStrategy):
    """Each LoRA pair is owned by one rank of ``process_group``; the others skip its step.

    Args:
        process_group: the group to shard over (default: the whole world).
        bucket_bytes: largest flat buffer broadcast at once when the moved factors are synchronised.
        full_state_dict: ``state_dict()`` gathers every pair's statistics to every rank, for flows
            that save one rank's state dict for all (accelerate's ``save_state``); the default
            keeps each rank's own, which ``torch.distributed.checkpoint`` wants. Loading a state
            dict that lacks this rank's statistics raises on every rank (:func:`owner_state_dict_hooks`).

    Per rank, LoRA statistics fall to about ``1 / world_size`` of the replicated mode's, and so
    does the step's compute; after each step every rank receives the factors that moved (one
    factor per pair with the alternating schedule), ``sum r (m or n)`` elements in all. The
    finiteness verdict is agreed with one all-reduce of one int32 per gradient; clipping adds one
    all-reduce of a float64 scalar.
    """

    replicated = False  # each pair is owned by one rank, assigned at construction
    restorable = False  # owners broadcast after the step: a raising rank strands its peers

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        bucket_bytes: int = 25 * 2**20,
        *,
        full_state_dict: bool = False,
    ) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.group = process_group
        self.bucket_bytes = bucket_bytes
        self.full_state_dict = full_state_dict
        self.owners: list[int] = []
        self.rank = 0

    def __repr__(self) -> str:
        world = dist.get_world_size(self.group) if dist.is_available() and dist.is_initialized() else "?"
        return f"PairSharded(world_size={world})"

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("PairSharded needs an initialised torch.distributed process group (init_process_group)")
        self.rank = dist.get_rank(self.group)
        check_ranks_agree(pairs, rule, self, self.group)
        state, cost = pair_costs(pairs, rule, param_group_of)
        self.owners = assign_pairs(state, cost, dist.get_world_size(self.group))
        self._device = pairs[0].a.device

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        owner_state_dict_hooks(optimizer, self, self.group, self.full_state_dict)

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        """Checked on this rank's gradients, agreed over the group (one all-reduce)."""
        return agree_flags(finite_flags(grads), self.group)

    def reduce_pair_squares(self, local: Tensor) -> Tensor:
        total = local.to(self._device, torch.float64, copy=True)
        dist.all_reduce(total, group=self.group)
        return total

    def publish(self, moved: Sequence[tuple[int, Tensor]]) -> None:
        """Broadcast every moved factor from its owner, bucketed by owner and dtype."""
        by_key: dict[tuple[int, torch.dtype], list[Tensor]] = {}
        for index, factor in moved:
            by_key.setdefault((self.owners[index], factor.dtype), []).append(factor)
        for (owner, _), factors in by_key.items():
            for tensors in fill_buckets(factors, lambda t: t.nbytes, self.bucket_bytes):
                _broadcast_bucket(tensors, owner, owner == self.rank, self.group)


def _broadcast_bucket(tensors: list[Tensor], owner: int, is_owner: bool, group: dist.ProcessGroup | None) -> None:
    """One broadcast of the concatenated ``tensors`` from group rank ``owner``, copied back in place."""
    with torch.no_grad():
        if is_owner:
            flat = torch.cat([t.reshape(-1) for t in tensors])
        else:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
        dist.broadcast(flat, group=group, group_src=owner)
        if not is_owner:
            for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(piece.view_as(t))
