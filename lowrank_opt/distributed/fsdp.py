"""FSDP2: factors that ``torch.distributed.fsdp.fully_shard`` turned into ``Shard(0)`` DTensors.

Every rule needs the whole frozen basis ``F`` (k, r): the update is rebuilt in full space from it
(MATH.md sections 6-8). So, around each step, every LoRA factor, its gradient and its statistics
are all-gathered into plain tensors, every rank computes the same step on them exactly as a single
process would, and each rank keeps its own shard of the result (slicing, no communication).
LoRA factors are ``r (m + n)`` elements per pair, a small fraction of the model, so the gather is
cheap next to FSDP's own gathers of the weights; the Grams then come from the gathered factors
with no further communication. A rule that reads the frozen base weight ``W0`` (Adafactor's
relative step) also gets it gathered, an ``m n`` all-gather per pair and step; rules declare
``reads_base_weight = False`` to skip it.

Between steps, every statistic with at least one dimension is a DTensor sharded on its first
dimension over the factor's mesh (for statistics shaped like the factor, the factor's own
sharding), so per-rank state memory is ``1 / world_size`` and checkpoints reshard; the wrapper's
step counter and basis Gram (scalars and ``r x r``) stay plain, replicated tensors. Parameters
that are not LoRA factors are stepped by the base optimizer on their DTensors, as FSDP2 does.
Gradient clipping adds one all-reduce for those parameters' norms; the finiteness check one more.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from .._sync import to_host
from .strategy import DistributedStrategy

if TYPE_CHECKING:
    from ..wrapper import LowRankWrapper

__all__ = ["FSDP2"]


class FSDP2(DistributedStrategy):
    """The mode for factors sharded by ``fully_shard`` (chosen automatically for DTensor factors).

    All ranks issue the same collectives in the same order: one all-gather per factor, gradient
    and statistic at each step. Uneven shards and empty shards (``r < world_size``) are handled by
    DTensor's own chunking.
    """

    def __repr__(self) -> str:
        return "FSDP2()"

    def bind(self, wrapper: LowRankWrapper) -> None:
        sharded = [f for pair in wrapper.pairs for f in (pair.a, pair.b) if isinstance(f, DTensor)]
        if not sharded:
            raise ValueError(
                "FSDP2: no LoRA factor is a DTensor; call fully_shard on the model before building the optimizer"
            )
        for factor in sharded:
            if factor.device_mesh.ndim != 1 or tuple(factor.placements) != (Shard(0),):
                raise ValueError(
                    f"FSDP2: factors must be sharded as (Shard(0),) on a 1-D mesh, got {tuple(factor.placements)} "
                    f"on a {factor.device_mesh.ndim}-D mesh"
                )
        self._group = sharded[0].device_mesh.get_group()

    @contextmanager
    def gathered(self, wrapper: LowRankWrapper) -> Iterator[None]:
        from ..wrapper import _WRAPPER_KEYS

        shadows: dict[DTensor, Tensor] = {}
        gather_bases = wrapper.rule.reads_base_weight
        for pair in wrapper.pairs:
            if gather_bases and isinstance(pair.base_weight, DTensor):
                shadows[pair.base_weight] = pair.base_weight.detach().full_tensor()  # type: ignore[attr-defined]
            for factor in (pair.a, pair.b):
                if not isinstance(factor, DTensor):
                    continue
                shadow = nn.Parameter(factor.detach().full_tensor())  # type: ignore[attr-defined]
                if isinstance(factor.grad, DTensor):
                    shadow.grad = factor.grad.full_tensor()
                shadows[factor] = shadow
                entry = wrapper.state.get(factor)
                if entry:
                    wrapper.state[factor] = {key: _full(value) for key, value in entry.items()}
        wrapper._swap_factors(cast("dict[Tensor, Tensor]", shadows))  # keys are DTensors
        try:
            yield
        finally:
            wrapper._swap_factors({gathered: factor for factor, gathered in shadows.items()})
            with torch.no_grad():
                for factor, gathered in shadows.items():
                    if not factor.requires_grad:
                        continue  # a frozen base weight: nothing to write back
                    factor.to_local().copy_(_shard(gathered.detach(), factor))
                    if isinstance(factor.grad, DTensor) and gathered.grad is not None:
                        factor.grad.to_local().copy_(_shard(gathered.grad, factor))
                    entry = wrapper.state.get(factor)
                    if entry:
                        wrapper.state[factor] = {
                            key: value if key in _WRAPPER_KEYS else _shard_statistic(value, factor)
                            for key, value in entry.items()
                        }

    def finite_flags(self, grads: Sequence[Tensor]) -> list[Tensor]:
        flags = [torch.isfinite(_local(g)).all() for g in grads]
        return self._agree(flags, grads, dist.ReduceOp.MIN, torch.int32)

    def squared_norms(self, grads: Sequence[Tensor]) -> list[Tensor]:
        squares = [_local(g).double().pow(2).sum() for g in grads]
        return to_host(self._agree(squares, grads, dist.ReduceOp.SUM, torch.float64), torch.float64)

    def _agree(self, values: list[Tensor], grads: Sequence[Tensor], op: Any, dtype: torch.dtype) -> list[Tensor]:
        """One all-reduce combines the per-shard ``values`` of the DTensor ``grads`` into whole-tensor ones."""
        sharded = [i for i, g in enumerate(grads) if isinstance(g, DTensor)]
        if not sharded:
            return values
        stacked = torch.stack([values[i].to(dtype) for i in sharded])
        dist.all_reduce(stacked, op=op, group=self._group)
        out = list(values)
        for j, i in enumerate(sharded):
            out[i] = stacked[j].to(values[i].dtype)
        return out


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(value: Any) -> Any:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _shard(full: Tensor, like: DTensor) -> Tensor:
    """This rank's piece of ``full`` under ``like``'s sharding (slicing only: every rank holds ``full``)."""
    return distribute_tensor(full.detach(), like.device_mesh, like.placements, src_data_rank=None).to_local()


def _shard_statistic(value: Any, factor: DTensor) -> Any:
    """A statistic with dimensions becomes a ``Shard(0)`` DTensor on the factor's mesh; scalars stay plain."""
    if not isinstance(value, Tensor) or isinstance(value, DTensor) or value.ndim == 0:
        return value
    return distribute_tensor(value.detach(), factor.device_mesh, [Shard(0)], src_data_rank=None)
