"""The generic rule: SGD with momentum equals dense SGD at full rank, declared optimizers run,
undeclared state is refused with the line to add, and ``rule=None`` picks the right rule."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import dense_trajectory, full_weight, lowrank_trajectory, make_pair, max_rel_error, quadratic_loss
from lowrank_opt_plugins import generic

import lowrank_opt as lo


def _loss(m: int, n: int):
    return quadratic_loss(torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.8, dampening=0.3, weight_decay=0.01),
        dict(),
    ],
)
@pytest.mark.parametrize("alternate_every", [1, 2])
def test_sgd_with_momentum_equals_dense_sgd_at_full_rank(options, alternate_every):
    r = 6
    pair = make_pair(r, r, r, scale=2.0, seed=3)
    loss = _loss(r, r)
    w0 = full_weight(pair).detach()
    opt = lo.LowRankWrapper(
        torch.optim.SGD([pair.a, pair.b], lr=1e-2, **options), [pair], alternate_every=alternate_every
    )
    assert opt.rule.name == "generic"
    lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(w0, loss, lambda p: torch.optim.SGD(p, lr=1e-2, **options), 50)
    assert max_rel_error(lowrank, dense) < 1e-9


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=1e-2),
        lambda p: torch.optim.NAdam(p, lr=1e-3),
        lambda p: torch.optim.RAdam(p, lr=1e-3),
    ],
    ids=["RMSprop", "Adagrad", "NAdam", "RAdam"],
)
def test_declared_optimizers_run_twenty_finite_steps(make):
    m, n, r = 12, 9, 4
    pair = make_pair(m, n, r, seed=4, zero_b=True)
    opt = lo.LowRankWrapper(make([pair.a, pair.b]), [pair], rule="generic")
    loss = _loss(m, n)
    first = loss(full_weight(pair)).item()
    trajectory = lowrank_trajectory(pair, loss, opt, 20)
    assert all(torch.isfinite(w).all() for w in trajectory)
    assert loss(full_weight(pair)).item() < first
    for factor in (pair.a, pair.b):  # both factors' statistics saw all 20 gradients
        assert int(opt.state[factor]["step"]) == 20


def test_rule_none_picks_the_rule_for_the_optimizer():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    picks = {
        torch.optim.AdamW(p): "loft_adamw",
        torch.optim.Adam(p): "loft_adamw",
        torch.optim.Adafactor(p): "loft_adafactor",
        torch.optim.Muon(p): "loft_muon",
        torch.optim.SGD(p, lr=0.1): "generic",
        torch.optim.RMSprop(p): "generic",
        torch.optim.Adagrad(p): "generic",
    }
    for optimizer, name in picks.items():
        assert lo.rule_for(optimizer).name == name, type(optimizer).__name__


def test_undeclared_optimizer_without_a_rule_lists_the_registered_rules():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="no rule is registered for LBFGS.*generic.*loft_adafactor.*loft_muon"):
        lo.rule_for(torch.optim.LBFGS(p))


class TracedSGD(torch.optim.SGD):
    """SGD that also keeps a trace of gradients under a key nobody declared."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p].setdefault("grad_trace", torch.zeros_like(p)).mul_(0.5).add_(p.grad)
        return super().step(closure)


def test_undeclared_state_key_raises_with_the_declaration_to_add():
    pair = make_pair(6, 5, 2, seed=1)
    opt = lo.LowRankWrapper(TracedSGD([pair.a, pair.b], lr=0.1, momentum=0.9), [pair])
    assert opt.rule.name == "generic"  # found through SGD in the MRO
    opt.zero_grad()
    _loss(6, 5)(full_weight(pair)).backward()
    with pytest.raises(ValueError) as err:
        opt.step()
    message = str(err.value)
    assert "'grad_trace'" in message and 'declare(TracedSGD, grad_trace="linear")' in message
    assert "momentum_buffer" not in message  # inherited from SGD's declaration


def test_a_declaration_makes_the_subclass_work():
    class TracedSGD2(TracedSGD):
        pass

    generic.declare(TracedSGD2, grad_trace="linear")
    assert generic.declared_kinds(TracedSGD2) == {
        "momentum_buffer": lo.StateKind.LINEAR,
        "grad_trace": lo.StateKind.LINEAR,
    }
    pair = make_pair(6, 5, 2, seed=1)
    opt = lo.LowRankWrapper(TracedSGD2([pair.a, pair.b], lr=0.1, momentum=0.9), [pair])
    trajectory = lowrank_trajectory(pair, _loss(6, 5), opt, 5)
    assert torch.isfinite(trajectory[-1]).all()


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.optim.SGD, dict(momentum_buffer="cubic")), "kind must be one of"),
        ((torch.optim.SGD, dict(momentum_buffer="block")), "'block'"),
        ((dict, dict(x="linear")), "Optimizer subclass"),
    ],
)
def test_bad_declarations_raise(args, match):
    cls, kinds = args
    with pytest.raises(ValueError, match=match):
        generic.declare(cls, **kinds)


def test_inactive_factor_is_put_back_and_only_the_active_one_moves():
    pair = make_pair(7, 5, 3, seed=2)
    opt = lo.LowRankWrapper(torch.optim.SGD([pair.a, pair.b], lr=0.1, momentum=0.9, weight_decay=0.1), [pair])
    a0, b0 = pair.a.detach().clone(), pair.b.detach().clone()
    opt.zero_grad()
    _loss(7, 5)(full_weight(pair)).backward()
    opt.step()  # b moves first
    assert torch.equal(pair.a.detach(), a0) and not torch.equal(pair.b.detach(), b0)
    assert math.isfinite(opt.state[pair.a]["momentum_buffer"].norm().item())
