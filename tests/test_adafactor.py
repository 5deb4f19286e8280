"""LoFT-Adafactor: full-rank equivalence with torch.optim.Adafactor, and the fast path against a
plain dense reference on rectangular pairs with a base weight (clamped and unclamped, both sides)."""

from __future__ import annotations

import math
import warnings

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
from lowrank_opt_plugins.loft_adafactor import LoFTAdafactor, _separable_update
from torch import Tensor

import lowrank_opt as lo


class ReferenceLoFTAdafactor:
    """docs/math.md section 7 written with dense matrices: ``X = s F g_hat`` (= ``P_F G``) and ``U`` are
    formed in full space, ``RMS(W)`` from ``W`` itself, solves with ``torch.linalg.solve``."""

    def __init__(
        self,
        b: Tensor,
        a: Tensor,
        scale: float,
        w0: Tensor,
        lr=1e-2,
        beta2_decay=-0.8,
        eps=(None, 1e-3),
        d=1.0,
        weight_decay=0.0,
    ):
        self.b, self.a, self.s, self.w0 = b.clone(), a.clone(), scale, w0
        self.lr, self.decay, self.d, self.wd = lr, beta2_decay, d, weight_decay
        self.eps1 = eps[0] if eps[0] is not None else torch.finfo(a.dtype).eps
        self.eps2 = eps[1]
        m, n = w0.shape
        self.stats = {side: [torch.zeros(m, dtype=a.dtype), torch.zeros(n, dtype=a.dtype)] for side in "ab"}
        self.t = 0
        self.partly_clamped = 0
        self.clipped = 0

    def weight(self) -> Tensor:
        return self.w0 + self.s * self.b @ self.a

    def _canon(self, side: str):
        return (self.b, self.a) if side == "a" else (self.a.T, self.b.T)

    def step(self, grad_w: Tensor, active: tuple[str, ...]) -> None:
        self.t += 1
        w = 1.0 * self.t**self.decay
        xs = {}
        for side in "ab":
            f, _ = self._canon(side)
            g_canon = grad_w if side == "a" else grad_w.T
            g = torch.linalg.solve(f.T @ f, f.T @ g_canon) / self.s
            x = self.s * f @ g
            xs[side] = x if side == "a" else x.T  # original orientation (m, n)
            row, col = self.stats[side]
            row.lerp_((xs[side] ** 2).mean(1), w)
            col.lerp_((xs[side] ** 2).mean(0), w)
        m, n = self.w0.shape
        alpha = max(self.eps2, (self.weight().norm() / math.sqrt(m * n)).item()) * min(self.lr, 1 / math.sqrt(self.t))
        new = {}
        for side in active:
            row, col = self.stats[side]
            v = torch.outer(row, col) / max(row.mean().item(), self.eps1)
            clamped = (v < self.eps1**2).sum().item()
            self.partly_clamped += 0 < clamped < v.numel()
            u = xs[side] / v.clamp(min=self.eps1**2).sqrt()
            rms = (u.norm() / math.sqrt(u.numel())).item()
            self.clipped += rms > self.d
            u = u / max(1.0, rms / self.d)
            f, c = self._canon(side)
            u_canon = u if side == "a" else u.T
            new[side] = c * (1 - self.lr * self.wd) - alpha * torch.linalg.solve(f.T @ f, f.T @ u_canon) / self.s
        if "a" in new:
            self.a = new["a"]
        if "b" in new:
            self.b = new["b"].T


def _target(m: int, n: int, seed: int = 2) -> Tensor:
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(weight_decay=0.1),
        dict(lr=0.03),  # at lr 0.1 cond(F) reaches 2.7e3, beyond what the rank tolerance resolves
        dict(lr=0.03, beta2_decay=-0.5),
        dict(eps=(3.0, 1e-3)),  # the clamp is active everywhere
        dict(maximize=True),
    ],
)
@pytest.mark.parametrize("alternate_every", [1, 2])
def test_full_rank_equivalence_with_torch_adafactor(options, alternate_every):
    # Seed 3 keeps both factors well conditioned along the way (cond(F) below 1e3, the range the
    # rank tolerance resolves): the damped solves lose about 10 eps cond(F)^2 per step.
    r = 6
    pair = make_pair(r, r, r, scale=2.0, seed=3)
    loss = quadratic_loss(_target(r, r))
    if options.get("maximize"):
        loss = (lambda inner: lambda w: -inner(w))(loss)
    w0 = full_weight(pair).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no base weight: RMS(s B A) is RMS(W) here
        opt = lo.LowRankWrapper(
            torch.optim.Adafactor([pair.a, pair.b], **options), [pair], alternate_every=alternate_every
        )
        lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(w0, loss, lambda p: torch.optim.Adafactor(p, **options), 50)
    assert max_rel_error(lowrank, dense) < 1e-9


@pytest.mark.parametrize("schedule", ["alternate", "both"])
@pytest.mark.parametrize(
    "eps, rows_scale, expect_clamp",
    [
        ((None, 1e-3), 1.0, False),
        ((3e-3, 1e-3), 1e-3, True),  # some rows have tiny gradients: the clamp bites on part of V
    ],
)
def test_matches_dense_reference_on_rectangular_pair_with_base_weight(schedule, eps, rows_scale, expect_clamp):
    m, n, r, scale = 11, 8, 3, 1.5
    pair = make_pair(m, n, r, scale=scale, seed=7)
    w0 = 0.3 * _target(m, n, seed=9)
    pair = lo.LoRAPair(pair.a, pair.b, scale, w0)
    weights = torch.ones(m, 1, dtype=torch.float64)
    weights[: m // 2] = rows_scale
    target = _target(m, n)
    loss = lambda w: quadratic_loss(target)(w * weights)  # noqa: E731
    ref = ReferenceLoFTAdafactor(pair.b.detach(), pair.a.detach(), scale, w0, lr=0.05, eps=eps, weight_decay=0.1)
    base = torch.optim.Adafactor([pair.a, pair.b], lr=0.05, eps=eps, weight_decay=0.1)
    # A small block forces the clamped evaluation through several column blocks.
    opt = lo.LowRankWrapper(base, [pair], rule_options={"block_elements": 2 * max(m, n)}, schedule=schedule)
    sched = lo.Schedule(schedule)
    for t in range(30):
        step_with_reference(ref, opt, pair, loss, sched.active(t))
        assert (full_weight(pair) - ref.weight()).norm() < 1e-10 * ref.weight().norm()
    assert (ref.partly_clamped > 0) == expect_clamp
    assert ref.clipped > 0  # the update-RMS clip was exercised too


def test_base_norm_every_refreshes_the_base_terms_on_schedule():
    """``base_norm_every = N`` refreshes the ``W0`` terms of ``RMS(W)`` at a pair's steps 1, 1 + N,
    ... for both factors and keeps them in between: the trajectory stays close to the exact rule,
    and ``N = 1`` is the exact rule."""
    m, n, r = 12, 9, 3
    w0 = _target(m, n, seed=11)
    loss = quadratic_loss(_target(m, n))
    trajectories = {}
    for every in (1, 4):
        pair = make_pair(m, n, r, seed=10)
        pair = lo.LoRAPair(pair.a, pair.b, 1.0, w0)
        opt = lo.LowRankWrapper(
            torch.optim.Adafactor([pair.a, pair.b], lr=0.05), [pair], rule_options={"base_norm_every": every}
        )
        trajectories[every] = lowrank_trajectory(pair, loss, opt, 12)
        steps = {int(opt.state[p]["base_norm_step"]) for p in (pair.a, pair.b)}
        assert steps == ({12} if every == 1 else {9})
    assert 0 < max_rel_error(trajectories[4], trajectories[1]) < 5e-2


def test_no_base_weight_warns_once():
    pair = make_pair(6, 5, 2, seed=1)
    opt = lo.LowRankWrapper(torch.optim.Adafactor([pair.a, pair.b]), [pair])
    loss = quadratic_loss(_target(6, 5))
    with pytest.warns(UserWarning, match="no base weight") as record:
        lowrank_trajectory(pair, loss, opt, 4)
    assert len([w for w in record if "no base weight" in str(w.message)]) == 1


def test_separable_and_blocked_evaluations_agree():
    """Without an active clamp the two evaluations are the same update, to rounding."""
    m, n, r = 13, 10, 4
    pair = make_pair(m, n, r, scale=2.0, seed=12)
    rule = LoFTAdafactor(block_elements=3 * m)
    group = torch.optim.Adafactor([pair.a]).param_groups[0]
    ctx = lo.Context.of(group, torch.ones(1, dtype=torch.float64), lo.Switches())
    for side in ("a", "b"):
        view = lo.view_of(pair, side)
        state = rule.init_state(view, ctx)
        g = torch.randn(view.coeff.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
        rule.observe(state, g, view, ctx)
        rows, cols = (state["row_var"], state["col_var"]) if side == "a" else (state["col_var"], state["row_var"])
        denom = state["row_var"].mean(-1)
        fast, fast_sq = _separable_update(g, view, rows, cols, denom)
        slow, slow_sq = rule._blocked_update(g, view, rows, cols, denom, 1e-30)
        assert torch.allclose(fast, slow, rtol=1e-10, atol=0) and torch.allclose(fast_sq, slow_sq, rtol=1e-10)


@pytest.mark.parametrize("bad", [dict(block_elements=0), dict(base_norm_every=0)])
def test_bad_options_raise(bad):
    pair = make_pair(4, 4, 2)
    with pytest.raises(ValueError, match=next(iter(bad))):
        lo.LowRankWrapper(torch.optim.Adafactor([pair.a, pair.b]), [pair], rule_options=bad)


def test_zero_eps1_is_refused():
    pair = make_pair(4, 4, 2)
    with pytest.raises(ValueError, match="eps1"):
        lo.LowRankWrapper(torch.optim.Adafactor([pair.a, pair.b], eps=(0.0, 1e-3)), [pair])
