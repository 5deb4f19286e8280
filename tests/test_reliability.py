"""All-or-nothing steps and loads, non-finite gradients, checkpoints refused whole, a broken plugin,
and the hyperparameters a rule refuses even when they change after construction."""

from __future__ import annotations

import copy
import warnings
from importlib.metadata import EntryPoint

import pytest
import torch
from helpers import full_weight, make_pair, quadratic_loss
from torch import Tensor, nn

import lowrank_opt as lo
from lowrank_opt import registry


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lo.inject_lora(model, rank=2, alpha=4, target=lambda name, module: name == "0")
    model[2].weight.requires_grad_(True)  # a parameter the base optimizer steps
    return model


def _backward(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()


def _everything(model: nn.Module, opt: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters, gradients and every state tensor, copied."""
    out = [p.detach().clone() for p in model.parameters()]
    out += [p.grad.clone() for p in model.parameters() if p.grad is not None]
    # Every state tensor but the in-memory basis sketches (a derived check, never saved).
    out += [
        v.clone()
        for entry in opt.state.values()
        for k, v in entry.items()
        if isinstance(v, Tensor) and k != "lowrank_basis_sketch"
    ]
    return out


def _unchanged(before: list[Tensor], after: list[Tensor]) -> bool:
    return len(before) == len(after) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(before, after)
    )


def _trained(make, steps: int = 2, **options) -> tuple[nn.Module, lo.LowRankWrapper]:
    model = _model()
    opt = lo.LowRankWrapper(make([p for p in model.parameters() if p.requires_grad]), model, **options)
    for t in range(steps):
        opt.zero_grad()
        _backward(model, t)
        opt.step()
    return model, opt


def test_nonfinite_skip_leaves_everything_untouched_and_counts():
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2), nonfinite="skip")
    opt.zero_grad()
    _backward(model, 5)
    model[2].weight.grad[0, 0] = float("inf")
    before = _everything(model, opt)
    with pytest.warns(
        UserWarning,
        match=r"non-finite gradient in parameter 2 of param group 0 \(shape \(3, 8\)\): step skipped \(1 so far\)",
    ):
        opt.step()
    assert _unchanged(before, _everything(model, opt)) and opt.skipped_steps == 1
    model[2].weight.grad[0, 0] = 0.0
    opt.step()  # the next finite step goes on as usual
    assert not _unchanged(before, _everything(model, opt))


def test_nonfinite_raise_names_the_parameter_that_is_not_a_factor():
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2))
    opt.zero_grad()
    _backward(model, 5)
    model[2].weight.grad[1, 2] = float("nan")
    before = _everything(model, opt)
    with pytest.raises(ValueError, match=r"non-finite gradient in parameter 2 of param group 0 \(shape \(3, 8\)\)"):
        opt.step()
    assert _unchanged(before, _everything(model, opt))


def _base_step_raises(**options) -> tuple[list[Tensor], list[Tensor]]:
    """Everything before and after a step in which a wrong-shape state entry of a non-LoRA
    parameter makes AdamW's own step raise, after the factors moved."""
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2), **options)
    opt.state[model[2].weight]["exp_avg"] = torch.zeros(5)
    opt.zero_grad()
    _backward(model, 5)
    before = _everything(model, opt)
    with pytest.raises(RuntimeError):
        opt.step()
    return before, _everything(model, opt)


def test_a_base_step_that_raises_restores_everything():
    """The step is undone whole."""
    assert _unchanged(*_base_step_raises())


def test_an_undeclared_state_key_of_the_generic_rule_restores_everything():
    class Labelled(torch.optim.SGD):
        """SGD that also keeps a key nobody declared."""

        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p]["label"] = torch.zeros(())

    from lowrank_opt_plugins.generic import declare

    declare(Labelled, momentum_buffer="linear")
    model, opt = _trained(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), rule="generic")
    twin = _model()
    twin.load_state_dict(model.state_dict())
    labelled = lo.LowRankWrapper(
        Labelled([p for p in twin.parameters() if p.requires_grad], lr=1e-2, momentum=0.9), twin, rule="generic"
    )
    opt.zero_grad()
    labelled.zero_grad()
    _backward(twin, 5)
    before = _everything(twin, labelled)
    with pytest.raises(ValueError, match="state key 'label' of Labelled is not declared"):
        labelled.step()
    assert _unchanged(before, _everything(twin, labelled))


def test_hyperparameters_changed_after_construction_are_refused_at_the_step():
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2))
    opt.param_groups[0]["amsgrad"] = True
    opt.zero_grad()
    _backward(model, 5)
    before = _everything(model, opt)
    with pytest.raises(ValueError, match="loft_adamw does not support amsgrad=True"):
        opt.step()
    assert _unchanged(before, _everything(model, opt))


def _checkpoint_errors():
    _, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2))
    good = opt.state_dict()
    factor = next(i for i, entry in good["state"].items() if "exp_avg_sq" in entry)
    nan = copy.deepcopy(good)
    nan["state"][factor]["exp_avg"][0, 0] = float("nan")
    negative = copy.deepcopy(good)
    for entry in negative["state"].values():
        if "lowrank_step" in entry:
            entry["lowrank_step"] = torch.tensor(-1)
    _, sgd = _trained(lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9), rule="generic")
    missing = {k: v for k, v in good.items() if k != "param_groups"}
    return [
        (nan, r"saved 'exp_avg' is not finite"),
        (negative, r"saved lowrank_step is -1, a count of steps"),
        (sgd.state_dict(), r"state dict was written by 'generic/SGD'; this optimizer is 'loft_adamw/AdamW'"),
        (missing, r"state dict lacks 'param_groups'"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_a_bad_checkpoint_is_refused_whole(index):
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2))
    state_dict, message = _checkpoint_errors()[index]
    before = _everything(model, opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)
    assert _unchanged(before, _everything(model, opt))


def test_a_generic_wrapper_refuses_a_checkpoint_of_another_optimizer_before_its_first_step():
    _, adam = _trained(lambda p: torch.optim.Adam(p, lr=1e-2), rule="generic")
    model = _model()
    fresh = lo.LowRankWrapper(
        torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-2), model, rule="generic"
    )
    with pytest.raises(ValueError, match="written by 'generic/Adam'; this optimizer is 'generic/RMSprop'"):
        fresh.load_state_dict(adam.state_dict())


def test_a_broken_plugin_is_reported_and_the_others_still_load(monkeypatch):
    good = list(registry.entry_points(group=registry.ENTRY_POINT_GROUP))
    broken = EntryPoint("broken", "no_such_module_anywhere:Rule", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [*good, broken])
    registry.available_rules.cache_clear()
    try:
        with pytest.warns(UserWarning, match="rule 'broken' .* could not be loaded and is skipped"):
            rules = registry.available_rules()
        assert "loft_adamw" in rules and "broken" not in rules
    finally:
        registry.available_rules.cache_clear()


def test_step_counters_are_int64_and_count_past_two_to_the_24():
    pair = make_pair(5, 4, 2)
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-3), [pair])
    for factor in (pair.a, pair.b):
        opt.state[factor]["lowrank_step"].fill_(2**24)
    loss = quadratic_loss(torch.randn(5, 4, dtype=torch.float64))
    moved = []
    for _ in range(2):
        a, b = pair.a.detach().clone(), pair.b.detach().clone()
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        moved.append((not torch.equal(a * 0 + pair.a, a), not torch.equal(b * 0 + pair.b, b)))
    assert opt.state[pair.a]["lowrank_step"].item() == 2**24 + 2
    assert opt.state[pair.a]["lowrank_step"].dtype == torch.int64
    # Balancing may rescale the resting factor by a power of two; the schedule still alternates b, a.
    assert moved[0][1] and moved[1][0]


def test_clip_without_a_step_then_an_edit_uses_the_edited_factors():
    """Nothing is cached between clip_grad_norm_ and step: the step sees the factors as they are."""
    pair = make_pair(6, 5, 2, seed=4)
    twin = make_pair(6, 5, 2, seed=4)
    loss = quadratic_loss(torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    opts = [lo.LowRankWrapper(torch.optim.AdamW([p.a, p.b], lr=1e-2), [p], balance=False) for p in (pair, twin)]
    for p, opt in zip((pair, twin), opts):
        opt.zero_grad()
        loss(full_weight(p)).backward()
    opts[0].clip_grad_norm_(float("inf"))
    for p in (pair, twin):
        with torch.no_grad():
            p.a.mul_(1.5)  # an edit between the measurement and the step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the edit is an outside change, flagged on both
        for opt in opts:
            opt.step()
    assert torch.equal(pair.a, twin.a) and torch.equal(pair.b, twin.b)


def test_an_outside_change_that_keeps_the_gram_is_detected():
    """Permuting the rows of ``b`` keeps ``b^T b``; the sketch ``C w`` still sees it."""
    pair = make_pair(6, 5, 2, seed=2)
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair])
    loss = quadratic_loss(torch.randn(6, 5, dtype=torch.float64))
    for _ in range(2):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    with torch.no_grad():
        pair.b.copy_(pair.b.flip(0))
    opt.zero_grad()
    loss(full_weight(pair)).backward()
    with pytest.warns(UserWarning, match="factor b changed outside the optimizer; the statistics of factor a"):
        opt.step()


def _rank_one_run(dtype: torch.dtype, scale: float, lr: float, lora: bool = False, steps: int = 200):
    """64 x 64, r = 8, peft's start (B = 0), one random input vector per step (rank-1 gradients)."""
    gen = torch.Generator().manual_seed(0)
    m = n = 64
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64) / 8
    target = (
        w0
        + torch.randn(m, 4, generator=gen, dtype=torch.float64)
        @ torch.randn(4, n, generator=gen, dtype=torch.float64)
        / 8
    )
    a0 = (torch.rand(8, n, generator=gen, dtype=torch.float64) * 2 - 1) / n**0.5
    xs = torch.randn(steps, n, generator=gen, dtype=torch.float64)
    a, b = nn.Parameter(a0.to(dtype)), nn.Parameter(torch.zeros(m, 8, dtype=dtype))
    base = torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0)
    opt = base if lora else lo.LowRankWrapper(base, [lo.LoRAPair(a, b, scale, w0.to(dtype))], advice=False)
    largest, losses = 0.0, []
    for t in range(steps):
        x = xs[t].to(dtype)
        residual = (w0.to(dtype) + scale * b @ a - target.to(dtype)) @ x
        opt.zero_grad()
        residual.square().sum().backward()
        opt.step()
        largest = max(largest, a.detach().abs().max().item())
        with torch.no_grad():
            losses.append((w0 + scale * b.double() @ a.double() - target).square().sum().item())
    return largest / a0.abs().max().item(), (scale * b.double() @ a.double()).detach(), losses


def test_from_zero_b_with_rank_one_gradients_the_factors_stay_bounded_and_the_run_is_well_posed():
    """The run that used to blow up: max |A| within 10x of its start in float32 and float64, the
    adapter moves by less than 1e-6 when s changes by 1 + 2^-20, float32 follows float64 within 1e-2."""
    growth64, delta64, _ = _rank_one_run(torch.float64, 2.0, 1e-3)
    growth32, delta32, _ = _rank_one_run(torch.float32, 2.0, 1e-3)
    _, perturbed, _ = _rank_one_run(torch.float64, 2.0 * (1 + 2**-20), 1e-3)
    assert growth64 < 10 and growth32 < 10, (growth64, growth32)  # measured 8.4 and 8.0
    assert (perturbed - delta64).norm() < 1e-6 * delta64.norm()  # measured 2e-11
    assert (delta32 - delta64).norm() < 1e-2 * delta64.norm()  # measured 6.6e-3


def test_from_zero_b_with_rank_one_gradients_the_loss_falls_as_fast_as_tuned_lora():
    """Each at its own best learning rate of a grid (LoRA-AdamW 1e-2, LoFT-AdamW 3e-2 here), LoFT's
    loss is at least as low as LoRA's at every 50th step."""
    grid = (3e-3, 1e-2, 3e-2)
    lora = min((_rank_one_run(torch.float64, 2.0, lr, lora=True)[2] for lr in grid), key=lambda c: c[-1])
    loft = min((_rank_one_run(torch.float64, 2.0, lr)[2] for lr in grid), key=lambda c: c[-1])
    assert all(loft[t] <= lora[t] for t in (49, 99, 149, 199)), (
        [loft[t] for t in (49, 199)],
        [lora[t] for t in (49, 199)],
    )


def test_bias_corrections_start_again_with_statistics_reset_by_an_outside_change():
    """After the reset, b's statistics have seen one gradient: its step is a fresh optimizer's
    first step from the same factors and gradient (bias corrections 1 - beta^1, not 1 - beta^3)."""
    pair = make_pair(7, 5, 2, seed=3)
    loss = quadratic_loss(torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair], balance=False)
    for _ in range(2):  # b moves, then a
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    with torch.no_grad():
        pair.a.mul_(1.5)  # b's basis changed: b's statistics are reset at the next step
    fresh = make_pair(7, 5, 2, seed=3)
    with torch.no_grad():
        fresh.a.copy_(pair.a)
        fresh.b.copy_(pair.b)
    fresh_opt = lo.LowRankWrapper(torch.optim.AdamW([fresh.a, fresh.b], lr=1e-2), [fresh], balance=False)
    for p, o in ((pair, opt), (fresh, fresh_opt)):
        o.zero_grad()
        loss(full_weight(p)).backward()
    before = pair.b.detach().clone()
    with pytest.warns(UserWarning, match="factor a changed outside the optimizer"):
        opt.step()  # b moves (its third step, its statistics' first)
    fresh_opt.step()  # b moves (the first step)
    assert torch.allclose(pair.b - before, fresh.b - before, rtol=1e-10, atol=0)
    assert int(opt.state[pair.b]["lowrank_stats_from"]) == 2


def test_a_non_transactional_step_takes_no_copy_and_leaves_a_failed_step_half_done():
    assert not _unchanged(*_base_step_raises(transactional=False))  # the factors moved before AdamW's step raised


def test_transactional_follows_the_strategy_unless_given():
    model, opt = _trained(lambda p: torch.optim.AdamW(p, lr=1e-2))
    assert opt.transactional is True  # replicated: a rank that raises can restore and go on
    assert not lo.distributed.PairSharded.restorable and not lo.distributed.FSDP2.restorable
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="transactional must be True, False or None, got 'yes'"):
        lo.LowRankWrapper(torch.optim.AdamW(params), model, transactional="yes")  # type: ignore[arg-type]
