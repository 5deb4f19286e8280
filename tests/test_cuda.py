"""Device checks, run where a CUDA device exists (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from helpers import full_weight, lowrank_trajectory, make_pair, quadratic_loss

import lowrank_opt as lo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _to(pair: lo.LoRAPair, device: str) -> lo.LoRAPair:
    a = torch.nn.Parameter(pair.a.detach().to(device))
    b = torch.nn.Parameter(pair.b.detach().to(device))
    return lo.LoRAPair(a, b, pair.scale)


@pytest.mark.parametrize("second_moment", ["exact", "factored", "diagonal"])
def test_cuda_matches_cpu_in_float64(second_moment):
    m, n, r = 40, 24, 4
    cpu = make_pair(m, n, r, scale=2.0, seed=1)
    gpu = _to(cpu, "cuda")
    target = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trajectories = []
    for pair, tgt in ((cpu, target), (gpu, target.cuda())):
        opt = lo.LowRankWrapper(
            torch.optim.AdamW([pair.a, pair.b], lr=1e-2, weight_decay=0.1),
            [pair],
            rule_options={"second_moment": second_moment},
            max_grad_norm=1.0,
        )
        trajectories.append([w.cpu() for w in lowrank_trajectory(pair, quadratic_loss(tgt), opt, 20)])
    for x, y in zip(*trajectories):
        assert (x - y).norm() < 1e-9 * y.norm()


def test_bfloat16_on_cuda_trains_and_resumes_on_device():
    pair = _to(make_pair(64, 48, 8, dtype=torch.float32, seed=3), "cuda")
    pair = lo.LoRAPair(
        torch.nn.Parameter(pair.a.detach().bfloat16()), torch.nn.Parameter(pair.b.detach().bfloat16()), 2.0
    )
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-3), [pair])
    target = torch.randn(64, 48, device="cuda")
    for _ in range(10):
        opt.zero_grad()
        (full_weight(pair).float() - target).pow(2).sum().backward()
        opt.step()
    assert torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()
    state = opt.state_dict()
    again = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-3), [pair])
    cpu_state = {
        "state": {k: {n: t.cpu() for n, t in v.items()} for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }
    again.load_state_dict(cpu_state)
    moved = again.state[pair.a]
    assert moved["exp_avg"].device.type == "cuda" and moved["exp_avg"].dtype == torch.float32
    assert moved["lowrank_step"].device.type == "cpu" and moved["lowrank_step"].item() == 10
