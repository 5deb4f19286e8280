"""Ranks that agree: one finiteness verdict, the same pairs checked at construction, FSDP1 refused.

One spawn of 2 gloo ranks runs every check; each rank records what it raised.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from dist_utils import LAYERS, Net, build, local_batch, spawn
from torch import nn

import lowrank_opt as lo

pytestmark = pytest.mark.distributed

MODES = ("replicated", "sharded", "fsdp2")
SKIPS = "nonfinite" in inspect.signature(lo.LowRankWrapper).parameters


def _outcome(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the type and message are what the test compares
        return type(err).__name__, str(err)
    return None


def _nan_on_rank_one(rank: int, world: int, mode: str, **options) -> tuple[tuple[str, str] | None, list[float]]:
    """One step after the gradients were averaged, rank 1's gradient of one factor made NaN."""
    net, opt = build("loft_adamw", mode, **options)
    x, y = local_batch(0, rank, world)
    nn.functional.mse_loss(net(x), y).backward()
    if rank == 1:
        layer = (net.module if mode != "fsdp2" else net).layers[3]
        grad = layer.lora_b.grad
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
    before = [p.detach().sum().item() for p in (opt.pairs[3].a, opt.pairs[3].b)] if mode != "fsdp2" else []
    outcome = _outcome(opt.step)
    after = [p.detach().sum().item() for p in (opt.pairs[3].a, opt.pairs[3].b)] if mode != "fsdp2" else []
    return outcome, [a - b for a, b in zip(after, before)]


class _Other(Net):
    """Rank 1's model in the mismatch checks: one layer of another rank."""

    def __init__(self) -> None:
        super().__init__(True)
        i, o, _ = LAYERS[4]
        self.layers[4] = lo.LoRALinear(nn.Linear(i, o), 3, alpha=6)


def _mismatched(rank: int, mode: str) -> tuple[str, str] | None:
    net: nn.Module = _Other() if rank == 1 else Net(True)
    strategy: lo.distributed.DistributedStrategy | None = None
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
    else:  # no DDP: it would refuse the models itself
        strategy = lo.distributed.PairSharded() if mode == "sharded" else lo.distributed.Replicated()
    base = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return _outcome(lambda: lo.LowRankWrapper(base, net, distributed=strategy))


def _fsdp1(rank: int) -> tuple[str, str] | None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    net = FullyShardedDataParallel(Net(True), device_id=torch.device("cpu"), use_orig_params=True)
    base = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return _outcome(lambda: lo.LowRankWrapper(base, net))


def _local_step(rank: int, world: int) -> None:
    net = Net(True)
    base = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    opt = lo.LowRankWrapper(base, net, distributed=lo.distributed.Replicated(local=True))
    x, y = local_batch(0, rank, world)
    nn.functional.mse_loss(net(x), y).backward()
    opt.step()


def _worker(rank: int, world: int) -> dict:
    out: dict = {}
    for mode in MODES:
        out["nan", mode] = _nan_on_rank_one(rank, world, mode)
        if SKIPS:
            out["skip", mode] = _nan_on_rank_one(rank, world, mode, nonfinite="skip")
        out["mismatch", mode] = _mismatched(rank, mode)
    if rank == 0:
        out["local"] = _outcome(lambda: _local_step(rank, world))
    out["fsdp1"] = _fsdp1(rank)
    return out


def test_ranks_agree_on_nonfinite_gradients_mismatched_pairs_and_fsdp1():
    rank0, rank1 = spawn(_worker, 2)
    for mode in MODES:
        # A NaN on rank 1 only: both ranks refuse the step with the same message, nothing moved.
        (err0, moved0), (err1, moved1) = rank0["nan", mode], rank1["nan", mode]
        assert err0 is not None and err0 == err1, (mode, err0, err1)
        assert err0[0] == "ValueError" and "non-finite gradient in factor b of" in err0[1] and "layers.3;" in err0[1], (
            err0
        )
        assert all(d == 0 for d in moved0 + moved1), (mode, moved0, moved1)
        if SKIPS:
            (err0, moved0), (err1, moved1) = rank0["skip", mode], rank1["skip", mode]
            assert err0 is None and err1 is None, (mode, err0, err1)
            assert all(d == 0 for d in moved0 + moved1), (mode, moved0, moved1)
        # Different pairs: the same ValueError on both ranks, at construction, naming the pair.
        err0, err1 = rank0["mismatch", mode], rank1["mismatch", mode]
        assert err0 is not None and err0 == err1, (mode, err0, err1)
        assert err0[0] == "ValueError" and "ranks hold different optimizers" in err0[1], err0
        assert "layers.4: W (12, 10), rank 2," in err0[1] and "rank 3," in err0[1], err0
    # A single-process optimizer built on rank 0 only, inside the job, must not wait for rank 1.
    assert rank0["local"] is None
    for rank in (rank0, rank1):
        assert rank["fsdp1"] is not None and rank["fsdp1"][0] == "ValueError", rank["fsdp1"]
        assert "FSDP1" in rank["fsdp1"][1] and "fully_shard" in rank["fsdp1"][1]
