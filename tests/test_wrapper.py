"""LowRankWrapper: training real models, the ablation switches, shared param groups, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import full_weight, make_pair, quadratic_loss
from torch import nn

import lowrank_opt as lo

peft = pytest.importorskip("peft")


def _peft_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(16, 12))
    model.add_module("act", nn.Tanh())
    model.add_module("head", nn.Linear(12, 4))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], modules_to_save=["head"])
    return peft.get_peft_model(model, config).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 16, generator=gen).to(next(model.parameters()).dtype)
    y = torch.randint(0, 4, (32,), generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("second_moment", ["exact", "factored", "diagonal"])
def test_peft_model_from_b_zero_trains(second_moment):
    model = _peft_model()
    opt = lo.LowRankWrapper(
        torch.optim.AdamW(_trainable(model), lr=1e-2),
        model,
        rule_options={"second_moment": second_moment},
        max_grad_norm=1.0,
    )
    losses = _train(model, opt, 20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    pair = opt.pairs[0]
    assert pair.a.abs().sum() > 0 and pair.b.abs().sum() > 0


def _trajectory(**options) -> torch.Tensor:
    m, n, r = 10, 8, 3
    pair = make_pair(m, n, r, scale=2.0, seed=11)
    target = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    loss = quadratic_loss(target)
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair], **options)
    for _ in range(12):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    return full_weight(pair).detach()


@pytest.mark.parametrize(
    "switch",
    [
        {"schedule": "both"},
        {"schedule": "sequential"},
        {"alternate_every": 3},
        {"rescale_grad": False},
        {"calibrate_first_moment": False},
        {"calibrate_second_moment": False},
        {"project_update": False},
        {"full_space_clip": False},
        {"rule_options": {"second_moment": "factored"}},
        {"rule_options": {"second_moment": "diagonal"}},
    ],
)
def test_every_ablation_switch_changes_the_trajectory(switch):
    reference = _trajectory(max_grad_norm=0.5)
    changed = _trajectory(max_grad_norm=0.5, **switch)
    assert torch.isfinite(changed).all()
    assert (changed - reference).norm() > 1e-6 * reference.norm(), switch


def test_lr_scheduler_on_the_wrapper_drives_the_lora_step():
    model = _peft_model()
    opt = lo.LowRankWrapper(torch.optim.AdamW(_trainable(model), lr=1e-2), model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = [p.detach().clone() for p in _trainable(model)]
    for _ in range(3):
        _train(model, opt, 1)
        scheduler.step()
    assert all(torch.equal(b, p) for b, p in zip(before, _trainable(model)))
    assert opt.param_groups is opt.base.param_groups


def test_other_parameters_follow_the_base_optimizer_unchanged():
    model = _peft_model()
    twin = _peft_model()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "lora" not in n]
    twin_head = [p for n, p in twin.named_parameters() if p.requires_grad and "lora" not in n]
    opt = lo.LowRankWrapper(torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1), model)
    plain = torch.optim.AdamW(twin_head, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in head]
        opt.zero_grad()
        for p, g in zip(head, grads):
            p.grad = g.clone()
        opt.step()
        plain.zero_grad()
        for p, g in zip(twin_head, grads):
            p.grad = g.clone()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(head, twin_head))


def test_rule_none_picks_loft_adamw_for_adam_and_adamw():
    for cls in (torch.optim.AdamW, torch.optim.Adam):
        pair = make_pair(4, 4, 2)
        opt = lo.LowRankWrapper(cls([pair.a, pair.b]), [pair])
        assert opt.rule.name == "loft_adamw"


def test_half_precision_factors_keep_float32_statistics():
    model = _peft_model(dtype=torch.bfloat16)
    opt = lo.LowRankWrapper(torch.optim.AdamW(_trainable(model), lr=1e-2), model)
    losses = _train(model, opt, 10)
    assert all(torch.isfinite(torch.tensor(losses)))
    for pair in opt.pairs:
        for factor in (pair.a, pair.b):
            assert factor.dtype == torch.bfloat16
            assert opt.state[factor]["exp_avg"].dtype == torch.float32
            assert opt.state[factor]["lowrank_step"].dtype == torch.int64


def test_non_finite_gradient_raises_and_changes_nothing():
    model = _peft_model()
    opt = lo.LowRankWrapper(torch.optim.AdamW(_trainable(model), lr=1e-2), model)
    _train(model, opt, 2)
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[opt.pairs[0].a].items()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 16)), torch.zeros(4, dtype=torch.long)).backward()
    opt.pairs[0].b.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient in factor b of base_model.model.proj"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert all(torch.equal(v, opt.state[opt.pairs[0].a][k]) for k, v in state.items())


def test_a_factor_changed_outside_the_optimizer_resets_its_partner_with_a_warning():
    pair = make_pair(6, 5, 2, seed=2)
    # No balancing: b's first moment is compared with this step's g_hat below, unrescaled.
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair], balance=False)
    loss = quadratic_loss(torch.randn(6, 5, dtype=torch.float64))
    for _ in range(2):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    assert opt.state[pair.b]["exp_avg"].abs().sum() > 0
    with torch.no_grad():
        pair.a.mul_(2.0)  # a is b's basis: b's statistics are now in the wrong coordinates
    opt.zero_grad()
    loss(full_weight(pair)).backward()
    g_hat = lo.view_of(pair, "b").rescale(pair.b.grad[None])[0]
    with pytest.warns(UserWarning, match="factor a changed outside the optimizer; the statistics of factor b"):
        opt.step()  # b moves at this step, so nothing re-bases its statistics afterwards
    # Reset before this step's gradient came in: b's first moment is (1 - beta1) g_hat alone.
    assert torch.allclose(opt.state[pair.b]["exp_avg"].T, 0.1 * g_hat, rtol=1e-12, atol=0)
    opt.zero_grad()
    loss(full_weight(pair)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # changes made by the optimizer itself are not flagged


def _errors():
    pair = make_pair(4, 4, 2)
    adam = lambda **kw: torch.optim.AdamW([pair.a, pair.b], **kw)  # noqa: E731
    frozen = make_pair(4, 4, 2, seed=5)
    frozen.a.requires_grad_(False)
    outsider = make_pair(4, 4, 2, seed=6)
    return [
        (
            lambda: lo.LowRankWrapper(torch.optim.SGD([pair.a, pair.b], lr=0.1), [pair], rule="loft_adamw"),
            "rule 'loft_adamw' lifts AdamW, Adam, not SGD",
        ),
        (lambda: lo.LowRankWrapper(adam(), [pair], rule="nope"), "unknown rule 'nope'; registered rules: "),
        (
            lambda: lo.LowRankWrapper(adam(), [pair], rule_options={"second_moment": "full"}),
            "second_moment must be one of",
        ),
        (lambda: lo.LowRankWrapper(adam(), [pair], rule_options={"typo": 1}), "does not accept rule_options"),
        (lambda: lo.LowRankWrapper(adam(amsgrad=True), [pair]), "loft_adamw does not support amsgrad=True"),
        (lambda: lo.LowRankWrapper(torch.optim.Adam([pair.a, pair.b], weight_decay=0.1), [pair]), "coupled L2 term"),
        (
            lambda: lo.LowRankWrapper(adam(), [pair], max_grad_norm=-1.0),
            "max_grad_norm must be a positive finite number or None, got -1.0",
        ),
        (
            lambda: lo.LowRankWrapper(adam(), [pair], schedule="random"),
            "schedule must be 'alternate', 'both' or 'sequential', got 'random'",
        ),
        (
            lambda: lo.LowRankWrapper(adam(), [pair], alternate_every=0),
            "alternate_every must be a positive integer, got 0",
        ),
        (lambda: lo.LowRankWrapper(adam(), [outsider]), "factor a is not in the base optimizer's param_groups"),
        (lambda: lo.LowRankWrapper(torch.optim.AdamW([frozen.b]), [frozen]), "factor a does not require grad"),
        (
            lambda: lo.LowRankWrapper(adam(), [pair], rule_options={"second_moment": "factored"}, project_update=False),
            "has no coefficient-space form",
        ),
        (lambda: lo.LowRankWrapper("adam", [pair]), "base_optimizer must be a built torch.optim.Optimizer, got str"),
        (
            lambda: lo.LowRankWrapper(adam(), [pair]).clip_grad_norm_(0),
            "max_norm must be a positive number, got 0",
        ),
    ]


@pytest.mark.parametrize("index", range(len(_errors())))
def test_bad_arguments_are_named(index):
    build, message = _errors()[index]
    with pytest.raises(ValueError, match=message):
        build()


def test_a_pair_with_one_gradient_missing_is_refused():
    pair = make_pair(4, 4, 2)
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b]), [pair])
    pair.a.grad = torch.ones_like(pair.a)
    with pytest.raises(ValueError, match="factor b has no gradient while its partner has one"):
        opt.step()


def test_a_new_adapter_added_through_add_param_group_is_lifted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lo.inject_lora(model, rank=2, target=lambda name, module: name == "0")
    first = [p for p in model.parameters() if p.requires_grad]
    opt = lo.LowRankWrapper(torch.optim.AdamW(first, lr=1e-2), model)
    assert len(opt.pairs) == 1
    model[2] = lo.LoRALinear(model[2], rank=2)  # a second adapter, trained from here on
    opt.add_param_group({"params": [model[2].lora_a, model[2].lora_b], "lr": 5e-3})
    assert len(opt.pairs) == 2 and opt.pairs[1].a is model[2].lora_a
    assert "exp_avg" in opt.state[model[2].lora_a] and "lowrank_step" in opt.state[model[2].lora_b]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert int(opt.state[model[2].lora_a]["lowrank_step"]) == 4
    assert model[2].lora_b.abs().sum() > 0  # b moved first, from zero, as for the first pair


def test_half_a_pair_in_a_new_group_is_refused_and_nothing_is_added():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    lo.inject_lora(model, rank=2, target=lambda name, module: name == "0")
    opt = lo.LowRankWrapper(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model)
    model[2] = lo.LoRALinear(model[2], rank=2)
    with pytest.raises(ValueError, match="add both LoRA factors of a pair in the same param group"):
        opt.add_param_group({"params": [model[2].lora_a]})
    assert len(opt.param_groups) == 1 and len(opt.pairs) == 1


def _sequential_run(schedule: str, a_lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    pair = make_pair(9, 7, 3, scale=1.5, seed=21)
    loss = quadratic_loss(torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(22)))
    base = torch.optim.AdamW([{"params": [pair.a], "lr": a_lr}, {"params": [pair.b]}], lr=1e-2)
    opt = lo.LowRankWrapper(base, [pair], schedule=schedule)
    for _ in range(5):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    return pair.a.detach().clone(), pair.b.detach().clone()


def test_sequential_moves_b_over_the_moved_a():
    """With ``a`` frozen (lr 0) its move is zero, ``T = I`` and the rebuilt view is the old one:
    ``sequential`` is ``both``. With ``a`` moving, ``b``'s gradient is re-expressed over the new
    ``a`` and the two schedules part."""
    for a, b in zip(_sequential_run("sequential", 0.0), _sequential_run("both", 0.0)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    sequential, both = _sequential_run("sequential", 1e-2), _sequential_run("both", 1e-2)
    assert all(torch.isfinite(t).all() for t in sequential)
    assert (sequential[1] - both[1]).norm() > 1e-6 * both[1].norm()


def test_sequential_is_refused_for_a_rule_without_its_own_update():
    pair = make_pair(4, 4, 2)
    with pytest.raises(ValueError, match="schedule='sequential' needs a rule with its own update; 'generic'"):
        lo.LowRankWrapper(torch.optim.SGD([pair.a, pair.b], lr=0.1, momentum=0.9), [pair], schedule="sequential")


def test_pair_grad_norms_add_up_to_the_clipping_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))
    lo.inject_lora(model, rank=2, target=lambda name, module: name in ("0", "2"))
    opt = lo.LowRankWrapper(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model)
    nn.functional.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    norms = opt.pair_grad_norms()
    assert len(norms) == 2 and all(n is not None and n > 0 for n in norms)
    total = opt.clip_grad_norm_(float("inf"))
    assert torch.allclose(torch.stack(norms).square().sum().sqrt().double(), total, rtol=1e-6)


class _RecordingStrategy(lo.distributed.Replicated):
    """The replicated mode, recording which factors each step says moved."""

    def __init__(self) -> None:
        super().__init__(local=True)
        self.published: list[int] = []

    def publish(self, moved):  # type: ignore[no-untyped-def]
        self.published.append(len(moved))


@pytest.mark.parametrize("balance", [True, False])
def test_only_the_factors_that_moved_travel(balance):
    """Both factors of a pair travel at its re-balancing steps (1, 2, 4, 8, 16, then every 16th),
    only the active one at the others: what a sharded mode broadcasts or sends back."""
    pair = make_pair(6, 5, 2, seed=3)
    strategy = _RecordingStrategy()
    opt = lo.LowRankWrapper(torch.optim.AdamW([pair.a, pair.b], lr=1e-2), [pair], distributed=strategy, balance=balance)
    target = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    loss = quadratic_loss(target)
    for _ in range(33):
        opt.zero_grad()
        loss(full_weight(pair)).backward()
        opt.step()
    both = {1, 2, 4, 8, 16, 32} if balance else set()
    assert strategy.published == [2 if step in both else 1 for step in range(1, 34)]
    assert [lo.engine.balancing_due(step) for step in range(1, 34)] == [
        step in {1, 2, 4, 8, 16, 32} for step in range(1, 34)
    ]
