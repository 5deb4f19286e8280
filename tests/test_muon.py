"""LoFT-Muon: full-rank equivalence with a dense float64 Muon and with torch.optim.Muon, the
update against its full-space definition on rectangular pairs, zero and rank-deficient factors."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dense_trajectory, full_weight, lowrank_trajectory, make_pair, max_rel_error, quadratic_loss
from torch import Tensor

import lowrank_opt as lo

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def dense_newton_schulz(x: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """torch.optim.Muon's iteration, written out in the input's dtype (float64 here)."""
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / max(y.norm().item(), eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


class DenseMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update rule on dense weights, with the iteration in float64."""

    def __init__(self, params, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=None):
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(mu).add_(p.grad, alpha=1 - mu)
                z = (1 - mu) * p.grad + mu * buf if group["nesterov"] else buf
                m, n = p.shape
                ratio = (
                    0.2 * math.sqrt(max(m, n))
                    if group["adjust_lr_fn"] == "match_rms_adamw"
                    else math.sqrt(max(1, m / n))
                )
                p.mul_(1 - lr * group["weight_decay"]).sub_(lr * ratio * dense_newton_schulz(z))


def _target(m: int, n: int, seed: int = 2) -> Tensor:
    return torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(nesterov=False),
        dict(weight_decay=0.0),
        dict(adjust_lr_fn="match_rms_adamw", lr=2e-3),
        dict(momentum=0.0),
    ],
)
@pytest.mark.parametrize("alternate_every", [1, 3])
def test_full_rank_equivalence_with_dense_float64_muon(options, alternate_every):
    r = 6
    options = {"lr": 2e-2, "weight_decay": 0.1, **options}
    pair = make_pair(r, r, r, scale=2.0, seed=3)
    loss = quadratic_loss(_target(r, r))
    w0 = full_weight(pair).detach()
    base = torch.optim.Muon([pair.a, pair.b], **options)
    opt = lo.LowRankWrapper(base, [pair], rule_options={"ns_dtype": "float64"}, alternate_every=alternate_every)
    lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(w0, loss, lambda p: DenseMuon(p, **options), 50)
    assert max_rel_error(lowrank, dense) < 1e-9


def test_close_to_torch_muon_with_bfloat16_iteration():
    """Both run Newton-Schulz in bfloat16, torch on (m, n) and LoFT on (r, l): the rounding
    differs, so the trajectories agree to bfloat16 accuracy (observed ~7e-3 after 50 steps)."""
    r = 6
    pair = make_pair(r, r, r, scale=2.0, seed=3)
    loss = quadratic_loss(_target(r, r))
    w0 = full_weight(pair).detach()
    opt = lo.LowRankWrapper(torch.optim.Muon([pair.a, pair.b], lr=2e-2), [pair])
    assert opt.rule.name == "loft_muon" and opt.rule.ns_dtype == "bfloat16"
    lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(w0, loss, lambda p: torch.optim.Muon(p, lr=2e-2), 50)
    assert max_rel_error(lowrank, dense) < 3e-2


def _one_update(pair: lo.LoRAPair, side: str, group: dict, grad_w: Tensor):
    """The rule's ``delta_C`` for ``side`` after one observed gradient, and the coefficient gradient."""
    rule = lo.resolve_rule("loft_muon", torch.optim.Muon([pair.a, pair.b]), {"ns_dtype": "float64"})
    view = lo.view_of(pair, side)
    grad_c = pair.scale * view.basis[0].T @ (grad_w if side == "a" else grad_w.T)  # dL/dC = s F^T G_canon (r, l)
    g_hat = view.rescale(view.canonical(grad_c[None]))
    ctx = lo.Context.of(group, torch.ones(1, dtype=torch.float64), lo.Switches())
    state = rule.init_state(view, ctx)
    rule.observe(state, g_hat, view, ctx)
    # The engine moves C <- C (1 - lr wd) - Delta: the coefficient change is returned here.
    delta = -rule.update(state, g_hat, view, ctx) - group["lr"] * group["weight_decay"] * view.coeff
    return delta[0], g_hat[0], view


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_update_is_dense_muon_of_the_projected_gradient_on_a_rectangular_pair(side, adjust_lr_fn):
    """``s F delta_C = -lr rho(m, n) NS(s F Z) - lr wd s F C`` with ``rho`` from the FULL shape."""
    m, n, r = 10, 7, 3
    pair = make_pair(m, n, r, scale=1.5, seed=4)
    group = dict(
        lr=0.1,
        weight_decay=0.2,
        momentum=0.9,
        nesterov=True,
        ns_coefficients=NS_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=adjust_lr_fn,
    )
    delta, g_hat, view = _one_update(pair, side, group, _target(m, n))
    z = (1 - 0.9) * g_hat + 0.9 * (1 - 0.9) * g_hat  # first step: M = (1 - mu) g
    ratio = 0.2 * math.sqrt(max(m, n)) if adjust_lr_fn else math.sqrt(max(1, m / n))
    s, f = pair.scale, view.basis[0]
    expected = -0.1 * ratio * dense_newton_schulz(s * f @ z) - 0.1 * 0.2 * s * f @ view.coeff[0]
    assert torch.allclose(s * f @ delta, expected, rtol=1e-10, atol=1e-12)


def test_zero_factor_gives_zero_update():
    """peft starts B at zero: A's basis is empty, so A does not move (and nothing is NaN)."""
    pair = make_pair(8, 6, 3, seed=5, zero_b=True)
    a0 = pair.a.detach().clone()
    # No balancing: it would rescale a by a power of two once b is no longer zero.
    opt = lo.LowRankWrapper(
        torch.optim.Muon([pair.a, pair.b], lr=0.1, weight_decay=0.0), [pair], schedule="both", balance=False
    )
    opt.zero_grad()
    quadratic_loss(_target(8, 6))(full_weight(pair)).backward()
    opt.step()
    assert torch.equal(pair.a.detach(), a0)
    assert torch.isfinite(pair.b).all() and pair.b.abs().sum() > 0


def test_rank_deficient_factor_gives_the_update_within_its_span():
    m, n, r = 9, 8, 3
    pair = make_pair(m, n, r, scale=2.0, seed=6)
    with torch.no_grad():
        pair.b.copy_(pair.b[:, :1] @ torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64))  # rank 1
    group = dict(
        lr=0.1,
        weight_decay=0.0,
        momentum=0.9,
        nesterov=False,
        ns_coefficients=NS_COEFFICIENTS,
        eps=1e-7,
        ns_steps=5,
        adjust_lr_fn=None,
    )
    delta, g_hat, view = _one_update(pair, "a", group, _target(m, n))
    assert torch.isfinite(delta).all()
    z = 0.1 * g_hat
    expected = -0.1 * math.sqrt(m / n) * dense_newton_schulz(pair.scale * view.basis[0] @ z)
    assert torch.allclose(pair.scale * view.basis[0] @ delta, expected, rtol=1e-8, atol=1e-10)


def test_bad_ns_dtype_raises():
    pair = make_pair(4, 4, 2)
    with pytest.raises(ValueError, match="ns_dtype"):
        lo.LowRankWrapper(torch.optim.Muon([pair.a, pair.b]), [pair], rule_options={"ns_dtype": "float16"})
