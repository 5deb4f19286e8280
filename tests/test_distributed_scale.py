"""4 gloo ranks: owner-computes FSDP2 (1-D mesh of 4), HSDP (2 x 2 mesh) and pair-sharded against
a single process, bit for bit. FSDP2 and HSDP use tiny buckets, so the step runs bucket by bucket
(with the clip's first pass).

Bit-identity needs gradients that every mode sums exactly: ranks 0 and 1 see the two halves of
each global batch, ranks 2 and 3 a loss weighted 0 (gradients exactly 0). Any order of summing
``g0 + g1 + 0 + 0`` gives the same float, and the divisions by 4 are exact, so the reference (one
process accumulating the four weighted micro-batches) has the same gradients as every mode, and
any difference is the optimizer's own. Ownership and the exchanges run over all four ranks.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import BASES, Net, full_params, identical_on_every_rank, local_batch, max_diff, rules, spawn
from torch import nn

import lowrank_opt as lo

pytestmark = pytest.mark.distributed

STEPS = 5
WORLD = 4
MODES = ("fsdp2", "hsdp", "sharded")


def _build(rule: str, mode: str) -> tuple[nn.Module, lo.LowRankWrapper]:
    make_base, train_bias = BASES[rule]
    net: nn.Module = Net(train_bias)
    strategy: lo.distributed.DistributedStrategy
    if mode == "single":
        strategy = lo.distributed.Replicated(local=True)
    elif mode == "sharded":
        net = nn.parallel.DistributedDataParallel(net)
        strategy = lo.distributed.PairSharded()
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape, dims = ((2, 2), ("replicate", "shard")) if mode == "hsdp" else ((WORLD,), ("shard",))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=dims)
        for layer in net.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        strategy = lo.distributed.FSDP2(bucket_bytes=256)  # a bucket per pair: the step runs bucket by bucket
    base = make_base([p for p in net.parameters() if p.requires_grad])
    return net, lo.LowRankWrapper(base, net, rule=rule, distributed=strategy, max_grad_norm=1.0)


def _train(net: nn.Module, opt: torch.optim.Optimizer, ranks: list[int]) -> None:
    """Each of ``ranks`` adds its micro-batch: the halves for ranks 0 and 1, a 0-weighted one for 2 and 3."""
    for t in range(STEPS):
        opt.zero_grad()
        for rank in ranks:
            x, y = local_batch(t, rank % 2, 2)
            weight = 1.0 if rank < 2 else 0.0
            scale = weight / WORLD if len(ranks) > 1 else weight  # DDP and FSDP divide by 4 themselves
            (nn.functional.mse_loss(net(x), y) * scale).backward()
        opt.step()


def _worker(rank: int, world: int, names: list[str]) -> dict:
    out: dict = {"diff": {}, "identical": {}, "statistics": {}}
    for name in names:
        net, opt = _build(name, "single")
        _train(net, opt, list(range(WORLD)))
        reference = full_params(net)
        out["statistics"][name, "single"] = _statistics_bytes(opt)
        for mode in MODES:
            net, opt = _build(name, mode)
            _train(net, opt, [rank])
            params = full_params(net)
            out["diff"][name, mode] = max_diff(params, reference)
            out["identical"][name, mode] = identical_on_every_rank(params)
            out["statistics"][name, mode] = _statistics_bytes(opt)
    return out


def _statistics_bytes(opt: lo.LowRankWrapper) -> int:
    return sum(
        v.nbytes
        for pair in opt.pairs
        for f in (pair.a, pair.b)
        for k, v in opt.state[f].items()
        if isinstance(v, torch.Tensor) and k not in ("lowrank_step", "lowrank_basis_gram", "lowrank_basis_sketch")
    )


def test_fsdp2_hsdp_and_sharded_on_4_ranks_equal_a_single_process():
    names = [name for name in rules() if name != "loft_muon"]
    results = spawn(_worker, WORLD, names, timeout_s=120.0)
    for name in names:
        for mode in MODES:
            for rank, result in enumerate(results):
                assert result["diff"][name, mode] == 0, (name, mode, rank, result["diff"][name, mode])
                assert result["identical"][name, mode], (name, mode)
            # Statistics are split between the ranks of a shard group: 4 for FSDP2, 2 for HSDP.
            whole = results[0]["statistics"][name, "single"]
            shares = [result["statistics"][name, mode] for result in results]
            if whole:
                groups = 2 if mode == "hsdp" else 1
                assert sum(shares) == groups * whole, (name, mode, shares, whole)
                assert max(shares) <= (0.7 if mode == "hsdp" else 0.45) * whole, (name, mode, shares, whole)
