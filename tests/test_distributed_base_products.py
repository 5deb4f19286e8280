"""The frozen weights' products under FSDP2 (2 gloo ranks): reduced from the shards, never gathered.

LoFT-Adafactor reads ``W0`` only through ``||W0||^2`` and ``<W0, B A>``. Under FSDP2 every rank
projects its own rows of ``W0`` and dots them with the all-gathered partner factor, and one
all-reduce sums two numbers per pair, for bases stored ``(m, n)`` (rows split like ``B``'s) and
``W0^T`` (rows of ``A^T``); a base that FSDP2 left whole is read by the pair's owner. The products are
float64, so the result matches a single process (which reads ``W0`` in blocks of rows instead)
to float32 rounding of the step alone; the trick of :func:`dist_utils.train` makes the gradients
bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from dist_utils import count_release_timeouts, full_params, max_diff, spawn, train
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

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
    if mode.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        # "fsdp2-whole-bases": the frozen weights stay whole plain tensors on every rank.
        frozen = {p for p in net.parameters() if not p.requires_grad} if mode == "fsdp2-whole-bases" else None
        for layer in net.layers:
            fully_shard(layer, ignored_params=frozen)
        fully_shard(net, ignored_params=frozen)
        strategy = lo.distributed.FSDP2()
    base = torch.optim.Adafactor([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return net, lo.LowRankWrapper(base, net, distributed=strategy, rule_options={"base_norm_every": every})


def _worker(rank: int, world: int) -> dict:
    gathered: list[tuple[int, ...]] = []
    gather = fsdp.FSDP2._start_gather

    def recording(self, items, runs=None):  # every tensor an owner gathers
        gathered.extend(tuple(t.shape) for _, t in items)
        return gather(self, items, runs)

    fsdp.FSDP2._start_gather = recording  # type: ignore[method-assign]
    timeouts = count_release_timeouts()
    out: dict = {"diff": {}, "bases": {}, "sharded bases": {}}
    for every in (1, 2):
        net, opt = _build("single", every)
        train(net, opt, range(STEPS), micro_batches=world)
        reference = full_params(net)
        for mode in ("fsdp2", "fsdp2-whole-bases"):
            net, opt = _build(mode, every)
            bases = {tuple(p.shape) for name, p in net.named_parameters() if not p.requires_grad}
            gathered.clear()
            train(net, opt, range(STEPS), rank, world)
            out["diff"][mode, every] = max_diff(full_params(net), reference)
            out["bases"][mode, every] = bases & set(gathered)
            out["sharded bases"][mode] = [isinstance(pair.base_weight, DTensor) for pair in opt.pairs]
    out["release timeouts"] = timeouts[0]
    return out


def test_fsdp2_reduces_base_products_from_shards_and_matches_a_single_process():
    for result in spawn(_worker, 2):
        assert result["sharded bases"] == {"fsdp2": [True] * 3, "fsdp2-whole-bases": [False] * 3}
        assert result["release timeouts"] == 0  # the partner factors' buffers went, also unread ones
        for key, diff in result["diff"].items():
            assert result["bases"][key] == set(), f"{key}: a base weight was gathered"
            assert diff < 1e-6, (key, diff)
