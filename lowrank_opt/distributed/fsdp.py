"""FSDP2: factors that ``torch.distributed.fsdp.fully_shard`` turned into ``Shard(0)`` DTensors.

Every rule needs the whole frozen basis ``F`` (k, r): the update is rebuilt in full space from it
(docs/math.md sections 6-8). So, around each step, every LoRA factor, its gradient and its statistics
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

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..layout import WRAPPER_KEYS
from ..pairs import LoRAPair
from ..rule import CalibrationRule
from .strategy import DistributedStrategy, Materialised

__all__ = ["FSDP2"]


class FSDP2(DistributedStrategy):
    """The mode for factors sharded by ``fully_shard`` (chosen automatically for DTensor factors).

    All ranks issue the same collectives in the same order: one all-gather per factor, gradient
    and statistic at each step. Uneven shards and empty shards (``r < world_size``) are handled by
    DTensor's own chunking.
    """

    def __repr__(self) -> str:
        return "FSDP2()"

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        sharded = [f for pair in pairs for f in (pair.a, pair.b) if isinstance(f, DTensor)]
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
    def materialised(
        self, pairs: Sequence[LoRAPair], state: MutableMapping[Tensor, dict[str, Any]], with_bases: bool
    ) -> Iterator[Materialised]:
        shadows: dict[Tensor, nn.Parameter] = {}  # DTensor factor -> whole plain Parameter
        work_state: dict[Tensor, dict[str, Any]] = {}
        work_pairs = []
        for pair in pairs:
            for factor in (pair.a, pair.b):
                if not isinstance(factor, DTensor):
                    work_state[factor] = state[factor]
                    continue
                shadow = nn.Parameter(factor.detach().full_tensor())  # type: ignore[attr-defined]
                if isinstance(factor.grad, DTensor):
                    shadow.grad = factor.grad.full_tensor()
                shadows[factor] = shadow
                work_state[shadow] = {key: _full(value) for key, value in state[factor].items()}
            base = pair.base_weight
            if with_bases and isinstance(base, DTensor):
                base = base.detach().full_tensor()  # type: ignore[attr-defined]
            a, b = (shadows.get(f, f) for f in (pair.a, pair.b))
            work_pairs.append(replace(pair, a=a, b=b, base_weight=base))
        originals: dict[Tensor, Tensor] = {shadow: factor for factor, shadow in shadows.items()}
        yield Materialised(work_pairs, work_state, originals)
        with torch.no_grad():
            for factor, shadow in shadows.items():
                assert isinstance(factor, DTensor)
                factor.to_local().copy_(_shard(shadow.detach(), factor))
                if isinstance(factor.grad, DTensor) and shadow.grad is not None:
                    factor.grad.to_local().copy_(_shard(shadow.grad, factor))
                state[factor] = {
                    key: value if key in WRAPPER_KEYS else _shard_statistic(value, factor)
                    for key, value in work_state[shadow].items()
                }

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        flags = [torch.isfinite(_local(g)).all() for g in grads]
        agreed = self._agree(flags, grads, dist.ReduceOp.MIN, torch.int32)
        return torch.stack(agreed) if agreed else torch.ones(0, dtype=torch.bool)

    def squared_norm(self, grads: Sequence[Tensor]) -> Tensor:
        squares = self._agree(
            [_local(g).double().square().sum() for g in grads], grads, dist.ReduceOp.SUM, torch.float64
        )
        return torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)

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
