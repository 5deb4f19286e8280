"""The frozen weights' products under FSDP2 (2 gloo ranks): reduced from the shards, never gathered.

LoFT-Adafactor reads ``W0`` only through ``||W0||^2`` and ``<W0, B A>``. Under FSDP2 every rank
projects its own rows of ``W0`` and one all-reduce sums them, for bases stored ``(m, n)`` (rows
split like ``B``'s) and ``W0^T`` (rows of ``A^T``, from ``A`` all-gathered). The products are
float64, so the result matches a single process (which reads ``W0`` in blocks of rows instead)
to float32 rounding of the step alone; the trick of :func:`dist_utils.train` makes the gradients
bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from dist_utils import full_params, max_diff, spawn, train
from torch import Tensor, nn

import lowrank_opt as lo
from lowrank_opt.distributed import fsdp

pytestmark = pytest.mark.distributed

STEPS = 6


class TransposedLoRA(nn.Module):
    """``y = x @ W0 + s (x A^T) B^T`` with ``W0`` stored ``(in, out)``: the layout of GPT-2's Conv1D."""

    def __init__(self, n: int, m: int, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, m) / n**0.5, requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(r, n) / n**0.5)
        self.lora_b = nn.Parameter(torch.zeros(m, r))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + 2.0 * (x @ self.lora_a.T) @ self.lora_b.T

    def lora_pairs(self) -> Iterator[lo.LoRAPair]:
        yield lo.LoRAPair(self.lora_a, self.lora_b, 2.0, self.weight, name="transposed", base_transposed=True)


class Net(nn.Module):
    """Input 6 to output 3 (as :mod:`dist_utils`' batches), through both layouts of ``W0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            [lo.LoRALinear(nn.Linear(6, 17), 3, alpha=6), TransposedLoRA(17, 9, 2), lo.LoRALinear(nn.Linear(9, 3), 2)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def _build(mode: str, every: int) -> tuple[nn.Module, lo.LowRankWrapper]:
    net: nn.Module = Net()
    strategy: lo.distributed.DistributedStrategy = lo.distributed.Replicated(local=True)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
        strategy = lo.distributed.FSDP2()
    base = torch.optim.Adafactor([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return net, lo.LowRankWrapper(base, net, distributed=strategy, rule_options={"base_norm_every": every})


def _worker(rank: int, world: int) -> dict:
    gathered: list[tuple[int, ...]] = []
    gather = fsdp.FSDP2._start_gather

    def recording(self, items):  # every tensor an owner gathers
        gathered.extend(tuple(t.shape) for _, t in items)
        return gather(self, items)

    fsdp.FSDP2._start_gather = recording  # type: ignore[method-assign]
    out: dict = {"diff": {}, "bases": {}}
    for every in (1, 2):
        net, opt = _build("single", every)
        train(net, opt, range(STEPS), micro_batches=world)
        reference = full_params(net)
        net, opt = _build("fsdp2", every)
        bases = {tuple(p.shape) for name, p in net.named_parameters() if not p.requires_grad}
        gathered.clear()
        train(net, opt, range(STEPS), rank, world)
        out["diff"][every] = max_diff(full_params(net), reference)
        out["bases"][every] = bases & set(gathered)
    return out


def test_fsdp2_reduces_base_products_from_shards_and_matches_a_single_process():
    for result in spawn(_worker, 2):
        for every in (1, 2):
            assert result["bases"][every] == set(), "a base weight was gathered"
            assert result["diff"][every] < 1e-6, (every, result["diff"][every])
