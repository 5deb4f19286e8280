"""LoFT-AdamW: full-rank equivalence with torch.optim.AdamW, alpha-invariance, and the fast
paths against the plain reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    dense_trajectory,
    full_weight,
    lowrank_trajectory,
    make_pair,
    max_rel_error,
    quadratic_loss,
    step_with_reference,
)
from reference import ReferenceLoFTAdamW

import lowrank_opt as lo


@pytest.mark.parametrize("scale", [0.5, 1.0, 8.0])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_full_rank_equivalence_with_dense_adamw(scale, weight_decay, max_grad_norm):
    r = 6
    pair = make_pair(r, r, r, scale=scale, seed=1)
    loss = quadratic_loss(torch.randn(r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    w0 = full_weight(pair).detach()
    base = torch.optim.AdamW([pair.a, pair.b], lr=1e-2, weight_decay=weight_decay)
    opt = lo.LowRankWrapper(base, [pair], max_grad_norm=max_grad_norm)
    lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(
        w0, loss, lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=weight_decay), 50, max_grad_norm
    )
    assert max_rel_error(lowrank, dense) < 1e-9


def test_public_clip_grad_norm_matches_dense_clipping():
    r = 5
    pair = make_pair(r, r, r, seed=3)
    loss = quadratic_loss(torch.randn(r, r, dtype=torch.float64))
    w0 = full_weight(pair).detach()
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair])
    dense_w = torch.nn.Parameter(w0.clone())
    dense_opt = torch.optim.AdamW([dense_w], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        norm = opt.clip_grad_norm_(0.3)
        opt.step()
        dense_opt.zero_grad()
        loss(dense_w).backward()
        dense_norm = torch.nn.utils.clip_grad_norm_([dense_w], 0.3)
        dense_opt.step()
        assert abs(norm.item() - dense_norm.item()) < 1e-9 * dense_norm.item()
    assert (full_weight(pair) - dense_w).norm() < 1e-9 * dense_w.norm()


def test_alpha_invariance_of_the_trajectory():
    """``s`` cancels: scale 1 and scale 16 give the same ``s B A`` from the same start (B = 0)."""
    m, n, r = 12, 9, 3
    target = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w0 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    trajectories = []
    for scale in (1.0, 16.0):
        pair = make_pair(m, n, r, scale=scale, seed=4, zero_b=True)
        pair = lo.LoRAPair(pair.a, pair.b, scale, w0)
        opt = lo.LowRankWrapper(
            torch.optim.AdamW([pair.a, pair.b], lr=1e-2, weight_decay=0.05), [pair], max_grad_norm=1.0
        )
        trajectories.append(lowrank_trajectory(pair, quadratic_loss(target), opt, 40))
    assert max_rel_error(trajectories[1], trajectories[0]) < 1e-9


@pytest.mark.parametrize("second_moment", ["exact", "factored", "diagonal"])
@pytest.mark.parametrize("schedule", ["alternate", "both"])
def test_fast_path_matches_plain_reference(second_moment, schedule):
    m, n, r, scale = 10, 7, 3, 2.0
    pair = make_pair(m, n, r, scale=scale, seed=7)
    target = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    loss = quadratic_loss(target)
    ref = ReferenceLoFTAdamW(
        pair.b.detach(), pair.a.detach(), scale, lr=1e-2, weight_decay=0.1, second_moment=second_moment
    )
    base = torch.optim.AdamW([pair.a, pair.b], lr=1e-2, weight_decay=0.1)
    # A tiny block forces the column-blocked evaluation through several blocks.
    opt = lo.LowRankWrapper(
        base, [pair], rule_options={"second_moment": second_moment, "block_elements": 2 * m}, schedule=schedule
    )
    sched = lo.Schedule(schedule)
    for t in range(30):
        step_with_reference(ref, opt, pair, loss, sched.active(t))
    assert (full_weight(pair) - ref.weight()).norm() < 1e-9 * ref.weight().norm()


def test_exact_never_allocates_more_than_a_column_block():
    """With a small block the exact step never holds a (k, l) tensor, and factored holds no
    tensor of k * l elements at all."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    m, n, r = 96, 80, 4
    for mode in ("exact", "factored"):
        pair = make_pair(m, n, r, dtype=torch.float32, seed=9)
        opt = lo.LowRankWrapper(
            torch.optim.AdamW([pair.a, pair.b], lr=1e-3),
            [pair],
            rule_options={"second_moment": mode, "block_elements": 16 * m},
        )
        for _ in range(2):
            opt.zero_grad()
            pair.a.grad = torch.randn_like(pair.a)
            pair.b.grad = torch.randn_like(pair.b)
            with Sizes() as sizes:
                opt.step()
            assert sizes.largest < m * n / 4, (mode, sizes.largest)


def _first_update(dtype: torch.dtype) -> torch.Tensor:
    m = n = 384
    pair = make_pair(m, n, 16, scale=1.0, dtype=torch.float64, seed=13)
    pair = lo.LoRAPair(
        torch.nn.Parameter(pair.a.detach().to(dtype)), torch.nn.Parameter(pair.b.detach().to(dtype)), 1.0
    )
    # No balancing: the difference below is the update alone, not a rescaled factor.
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-3), [pair], balance=False)
    gen = torch.Generator().manual_seed(14)
    pair.a.grad = (1e-3 * torch.randn(pair.a.shape, generator=gen, dtype=torch.float64)).to(dtype)
    pair.b.grad = (1e-3 * torch.randn(pair.b.shape, generator=gen, dtype=torch.float64)).to(dtype)
    before = pair.b.detach().double().clone()
    opt.step()  # b moves first
    return pair.b.detach().double() - before


def test_float32_exact_update_stays_within_adams_bound(monkeypatch):
    """In float32 the quadratic form f^T Q f cancels where f^T g nearly vanishes; without the
    Cauchy-Schwarz floor the first step's U reaches hundreds where AdamW's is at most 1."""
    import lowrank_opt_plugins.loft_adamw as loft_adamw

    reference = _first_update(torch.float64)

    def worst_error() -> float:
        return ((_first_update(torch.float32) - reference).abs().max() / reference.abs().max()).item()

    assert worst_error() < 1.5e-2  # measured 5e-3: float32 rounding of entries where U = sign(f^T g)
    monkeypatch.setattr(loft_adamw, "second_moment_floor", lambda *args: None)
    assert worst_error() > 1.5e-2  # measured 5e-2: the unbounded entries show
