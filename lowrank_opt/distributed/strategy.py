"""The contract between :class:`~lowrank_opt.LowRankWrapper` and a distributed strategy.

The wrapper computes every step as in a single process; a strategy is given data at a few named
points and gives data back. It never changes the wrapper's pairs or param groups:

* :meth:`DistributedStrategy.setup`: once, with the pairs, the rule and each factor's param group
  (assign work, check inputs);
* :meth:`DistributedStrategy.owns`: whether this rank keeps the statistics of a pair and steps it;
* :meth:`DistributedStrategy.materialised`: a context that yields the pairs as whole, plain
  tensors with their gradients and state entries (:class:`Materialised`), and writes back on exit
  what the step changed (FSDP2 gathers and re-shards there; the other modes hand over their own
  tensors);
* :meth:`DistributedStrategy.finite_flags`, :meth:`DistributedStrategy.reduce_pair_squares` and
  :meth:`DistributedStrategy.squared_norm`: the finiteness check and the clipping norms, agreed
  over ranks where the work or the tensors are split;
* :meth:`DistributedStrategy.publish`: after the step, every rank gets the factors that moved.

The default, :class:`Replicated`, hands over its own tensors and communicates nothing: a single
process, or DDP, where every rank holds the same gradients and computes the same step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..engine import finite_flags
from ..pairs import LoRAPair
from ..rule import CalibrationRule

__all__ = ["DistributedStrategy", "Materialised", "Replicated", "state_bytes"]


@dataclass(frozen=True)
class Materialised:
    """The pairs as one step sees them.

    Attributes:
        pairs: the pairs, in the wrapper's order, with whole plain factors (and a whole base
            weight where asked) that carry their gradients.
        state: the state entry of every factor of ``pairs``, keyed by those factors.
        originals: working factor -> the optimizer's parameter, where the two differ.
    """

    pairs: list[LoRAPair]
    state: MutableMapping[Tensor, dict[str, Any]]
    originals: dict[Tensor, Tensor] = field(default_factory=dict)


class DistributedStrategy:
    """Base class of the strategies; on its own it is the replicated mode."""

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        """Called once by the wrapper, after it found its pairs and rule, before any state exists."""

    def owns(self, index: int) -> bool:
        """Whether this rank holds the statistics of pair ``index`` and computes its step."""
        return True

    @contextmanager
    def materialised(
        self, pairs: Sequence[LoRAPair], state: MutableMapping[Tensor, dict[str, Any]], with_bases: bool
    ) -> Iterator[Materialised]:
        """Around state creation, clipping and every step: the pairs as whole, plain tensors.

        ``with_bases``: the rule reads the frozen base weights, so they must be whole too."""
        yield Materialised(list(pairs), state)

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        """Whether each gradient of the step (the factors' of the stepping pairs, then the other
        parameters') is finite everywhere: one bool tensor ``(len(grads),)``, the same on every rank."""
        return finite_flags(grads)

    def reduce_pair_squares(self, local: Tensor) -> Tensor:
        """The sum of the squared full-space norms of this rank's pairs (0-dim float64) -> of all pairs."""
        return local

    def squared_norm(self, grads: Sequence[Tensor]) -> Tensor:
        """``sum ||g||^2`` (0-dim float64) of the gradients of the parameters that are not LoRA factors."""
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        norms = torch._foreach_norm(list(grads))
        return torch.stack([n.to(norms[0].device, torch.float64) for n in norms]).square().sum()

    def publish(self, moved: Sequence[tuple[int, Tensor]]) -> None:
        """After the step: ``(pair index, factor)`` of every factor that moved, in the same order on every rank."""


class Replicated(DistributedStrategy):
    """Every rank computes every step (a single process, or DDP with its averaged gradients).

    Nothing is communicated by the optimizer: DDP already made the gradients equal, and the step
    is deterministic, so the ranks stay bit-identical. Each rank holds the whole optimizer state.
    """

    def __repr__(self) -> str:
        return "Replicated()"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (local shards of DTensors), every parameter included."""
    from torch.distributed.tensor import DTensor

    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total
