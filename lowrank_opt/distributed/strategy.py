"""The contract between :class:`~lowrank_opt.LowRankWrapper` and a distributed strategy.

The wrapper computes every step as in a single process; a strategy decides, at a few named
points, what this rank does:

* :meth:`DistributedStrategy.bind`: once, when the wrapper is built (assign work, check inputs);
* :meth:`DistributedStrategy.owns`: whether this rank keeps the statistics of a pair and steps it;
* :meth:`DistributedStrategy.gathered`: a context around every step in which the factors are
  plain, whole tensors (FSDP2 gathers its shards there);
* :meth:`DistributedStrategy.finite_flags`, :meth:`DistributedStrategy.reduce_squares` and
  :meth:`DistributedStrategy.squared_norms`: the finiteness check and the clipping norms, agreed
  over ranks where the work or the tensors are split;
* :meth:`DistributedStrategy.synchronize`: after the step, every rank gets the factors that moved.

The default, :class:`Replicated`, does nothing at any of these points: a single process, or DDP,
where every rank holds the same gradients and computes the same step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._sync import to_host

if TYPE_CHECKING:
    from ..wrapper import LowRankWrapper

__all__ = ["DistributedStrategy", "Replicated"]


class DistributedStrategy:
    """Base class of the strategies; on its own it is the replicated mode (every hook a no-op)."""

    def bind(self, wrapper: LowRankWrapper) -> None:
        """Called once by the wrapper, after it found its pairs and rule, before any state exists."""

    def owns(self, index: int) -> bool:
        """Whether this rank holds the statistics of pair ``index`` and computes its step."""
        return True

    @contextmanager
    def gathered(self, wrapper: LowRankWrapper) -> Iterator[None]:
        """Around state creation, clipping and every step: the factors are whole, plain tensors inside."""
        yield

    def finite_flags(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Whether each gradient is finite everywhere (0-dim bool tensors), the same answer on every rank."""
        return [torch.isfinite(g).all() for g in grads]

    def reduce_squares(self, squares: list[Tensor]) -> list[Tensor]:
        """Squared full-space norms of this rank's pairs (float64, CPU) -> those of all pairs."""
        return squares

    def squared_norms(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """``||g||^2`` (float64, CPU) of the gradients of the parameters that are not LoRA factors."""
        return to_host([g.double().pow(2).sum() for g in grads], torch.float64)

    def synchronize(self, moved: Sequence[tuple[int, Tensor]]) -> None:
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
