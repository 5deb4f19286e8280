"""MuonWithAdamW: bit-for-bit equal to torch.optim.Muon and torch.optim.AdamW stepped separately,
one state dict, schedulers on both parts, the split from a model, errors naming the bad value."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import lowrank_opt as lo
from lowrank_opt.hybrid import MuonWithAdamW


class Net(nn.Module):
    """Two hidden matrices for Muon; a bias, a norm and a head for AdamW."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.mid = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.norm(torch.tanh(self.hidden(x))))))


def _loss(net: nn.Module, step: int) -> Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 6, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    device = next(net.parameters()).device
    return (net(x.to(device)) - y.to(device)).pow(2).mean()


def _muon_params(net: Net) -> list[nn.Parameter]:
    return [net.hidden.weight, net.mid.weight]


def _adamw_params(net: Net) -> list[nn.Parameter]:
    return [net.hidden.bias, *net.norm.parameters(), *net.head.parameters()]


def _hybrid(net: Net, **kwargs) -> MuonWithAdamW:
    return MuonWithAdamW(
        [
            {"params": _muon_params(net), "use_muon": True},
            {"params": _adamw_params(net), "use_muon": False},
        ],
        **kwargs,
    )


def _train(net: nn.Module, optimizers: list[torch.optim.Optimizer], steps: range, after: Callable[[], None]) -> None:
    for step in steps:
        for opt in optimizers:
            opt.zero_grad()
        _loss(net, step).backward()
        for opt in optimizers:
            opt.step()
        after()


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "muon_kw, adamw_kw",
    [
        ({}, {}),
        (
            {"momentum": 0.9, "nesterov": False, "weight_decay": 0.05, "adjust_lr_fn": "match_rms_adamw"},
            {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.0, "amsgrad": True},
        ),
    ],
)
@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_equals_muon_and_adamw_stepped_separately(muon_kw: dict, adamw_kw: dict, device: str) -> None:
    # On a GPU both sides pick torch's for-each AdamW; on the CPU its single-tensor one.
    net, ref = Net().to(device), Net().to(device)
    hybrid = _hybrid(net, lr=0.02, **muon_kw, **{f"adamw_{k}": v for k, v in adamw_kw.items()}, adamw_lr=3e-3)
    muon = torch.optim.Muon(_muon_params(ref), lr=0.02, **muon_kw)
    adamw = torch.optim.AdamW(_adamw_params(ref), lr=3e-3, **adamw_kw)
    _train(net, [hybrid], range(6), lambda: None)
    _train(ref, [muon, adamw], range(6), lambda: None)
    _assert_same(net, ref)
    assert not any(torch.equal(p.cpu(), q) for p, q in zip(net.parameters(), Net().parameters()))  # all moved


def test_groups_carry_their_own_hyperparameters() -> None:
    net, ref = Net(), Net()
    hybrid = MuonWithAdamW(
        [
            {"params": [net.hidden.weight], "use_muon": True, "lr": 0.05},
            {"params": [net.mid.weight], "use_muon": True},
            {"params": _adamw_params(net)[:3], "use_muon": False, "weight_decay": 0.1},
            {"params": _adamw_params(net)[3:], "use_muon": False},
        ],
        lr=0.01,
        adamw_lr=2e-3,
    )
    assert [g["lr"] for g in hybrid.param_groups] == [0.05, 0.01, 2e-3, 2e-3]
    assert [g["weight_decay"] for g in hybrid.param_groups] == [0.1, 0.1, 0.1, 0.01]
    assert "momentum" not in hybrid.param_groups[2] and "betas" not in hybrid.param_groups[0]
    reference = [
        torch.optim.Muon([ref.hidden.weight], lr=0.05),
        torch.optim.Muon([ref.mid.weight], lr=0.01),
        torch.optim.AdamW(_adamw_params(ref)[:3], lr=2e-3, weight_decay=0.1),
        torch.optim.AdamW(_adamw_params(ref)[3:], lr=2e-3),
    ]
    _train(net, [hybrid], range(4), lambda: None)
    _train(ref, reference, range(4), lambda: None)
    _assert_same(net, ref)


def test_a_scheduler_acts_on_both_parts() -> None:
    net, ref = Net(), Net()
    hybrid = _hybrid(net, lr=0.02, adamw_lr=1e-2)
    muon = torch.optim.Muon(_muon_params(ref), lr=0.02)
    adamw = torch.optim.AdamW(_adamw_params(ref), lr=1e-2)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (hybrid, muon, adamw)]
    _train(net, [hybrid], range(5), schedulers[0].step)
    _train(ref, [muon, adamw], range(5), lambda: [s.step() for s in schedulers[1:]])
    assert [g["lr"] for g in hybrid.param_groups] == [0.02 / 4, 1e-2 / 4]
    _assert_same(net, ref)


def _save(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    net = Net()
    opt = _hybrid(net, lr=0.02, adamw_lr=1e-2, adamw_amsgrad=True)
    _train(net, [opt], range(3), lambda: None)
    checkpoint = _save({"model": net.state_dict(), "optimizer": opt.state_dict()})
    _train(net, [opt], range(3, 6), lambda: None)

    resumed = Net(seed=1)
    ckpt = torch.load(checkpoint, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _hybrid(resumed)  # hyperparameters come back from the state dict
    opt2.load_state_dict(ckpt["optimizer"])
    assert [g["lr"] for g in opt2.param_groups] == [0.02, 1e-2]
    assert opt2.param_groups[1]["amsgrad"] is True
    _train(resumed, [opt2], range(3, 6), lambda: None)
    _assert_same(resumed, net)
    state = opt2.state_dict()["state"]
    assert set(state[0]) == {"momentum_buffer"} and set(state[2]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_load_refuses_groups_of_the_other_part() -> None:
    net = Net()
    opt = MuonWithAdamW(
        [{"params": [net.hidden.bias], "use_muon": False}, {"params": [net.hidden.weight], "use_muon": False}]
    )
    other = MuonWithAdamW(
        [{"params": [net.hidden.bias], "use_muon": False}, {"params": [net.hidden.weight], "use_muon": True}]
    )
    with pytest.raises(ValueError, match="param group 1 has use_muon=True but the state dict's has use_muon=False"):
        other.load_state_dict(opt.state_dict())


def test_from_model_puts_lora_factors_and_chosen_matrices_in_muon() -> None:
    net = Net()
    lo.inject_lora(net, rank=2, alpha=4, target=lambda name, module: name == "mid")
    for module in (net.hidden, net.norm, net.head):  # inject_lora froze them; train them as well
        module.requires_grad_(True)
    opt = MuonWithAdamW.from_model(
        net, muon_params=lambda name, p: name == "hidden.weight", lr=0.03, adamw_lr=1e-3, adamw_weight_decay=0.0
    )
    pair = lo.find_lora_pairs(net)[0]
    muon_group, adamw_group = opt.param_groups
    assert muon_group["use_muon"] and not adamw_group["use_muon"]
    assert {id(p) for p in muon_group["params"]} == {id(pair.a), id(pair.b), id(net.hidden.weight)}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert {id(p) for p in adamw_group["params"]} == trainable - {id(p) for p in muon_group["params"]}
    assert (muon_group["lr"], adamw_group["lr"], adamw_group["weight_decay"]) == (0.03, 1e-3, 0.0)
    assert isinstance(opt, torch.optim.Muon)
    assert lo.rule_for(opt).name == "loft_muon"


def test_from_model_without_lora() -> None:
    net = Net()
    opt = MuonWithAdamW.from_model(net, lora=False, muon_params=lambda name, p: name.endswith("weight") and p.ndim == 2)
    assert len(opt.param_groups[0]["params"]) == 3  # hidden, mid and head weights
    with pytest.raises(ValueError, match="no trainable LoRA pair"):
        MuonWithAdamW.from_model(net)


@pytest.mark.parametrize(
    "groups, kwargs, message",
    [
        ([{"params": [nn.Parameter(torch.ones(3, 3))]}], {}, "param group 0 needs a boolean 'use_muon'"),
        ([nn.Parameter(torch.ones(3, 3))], {}, "needs a boolean 'use_muon'"),
        (
            [{"params": [nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3))], "use_muon": True}],
            {},
            r"parameter 1 has shape \(3,\); Muon steps only 2-D",
        ),
        ([{"params": [nn.Parameter(torch.ones(3))], "use_muon": False, "ns_steps": 3}], {}, "sets ns_steps"),
        ([{"params": [nn.Parameter(torch.ones(3, 3))], "use_muon": True, "betas": (0.9, 0.9)}], {}, "sets betas"),
        ([{"params": [nn.Parameter(torch.ones(3, 3))], "use_muon": True}], {"lr": -1.0}, "lr must be .* got -1.0"),
        (
            [{"params": [nn.Parameter(torch.ones(3))], "use_muon": False}],
            {"adamw_betas": (0.9, 1.0)},
            r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)",
        ),
        ([{"params": [nn.Parameter(torch.ones(3, 3))], "use_muon": True}], {"adjust_lr_fn": "rms"}, "got 'rms'"),
        ([{"params": [nn.Parameter(torch.ones(3, 3))], "use_muon": True}], {"ns_steps": 100}, "got 100"),
    ],
)
def test_bad_input_names_the_bad_value(groups: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MuonWithAdamW(groups, **kwargs)


def test_from_model_refuses_a_1d_parameter_for_muon() -> None:
    with pytest.raises(ValueError, match=r"parameter 'hidden.bias' of shape \(8,\)"):
        MuonWithAdamW.from_model(Net(), lora=False, muon_params=lambda name, p: name.startswith("hidden"))


def test_add_param_group_takes_the_part_defaults() -> None:
    net = Net()
    opt = MuonWithAdamW([{"params": [net.hidden.weight], "use_muon": True}], lr=0.02, adamw_lr=5e-4)
    opt.add_param_group({"params": net.head.parameters(), "use_muon": False})
    assert opt.param_groups[1]["lr"] == 5e-4 and opt.param_groups[1]["betas"] == (0.9, 0.999)
    assert len(opt.param_groups[1]["params"]) == 2
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))], "use_muon": True})


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(x)))


def _peft_model() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"])
    model = peft.get_peft_model(Tiny(), config)
    for name, p in model.named_parameters():  # peft starts B at zero; a random B makes A move from step 1
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    return model


def _wrapped(model: nn.Module) -> lo.LowRankWrapper:
    hybrid = MuonWithAdamW.from_model(model, lr=0.02, adamw_lr=1e-2)
    return lo.LowRankWrapper(hybrid, model)


def test_under_the_wrapper_trains_and_resumes() -> None:
    model = _peft_model()
    opt = _wrapped(model)
    assert opt.rule.name == "loft_muon"
    losses = []
    for step in range(8):  # one batch throughout, so the loss must fall
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 3:
            checkpoint = _save({"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert losses[-1] < losses[0]

    resumed = _peft_model()
    ckpt = torch.load(checkpoint, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _wrapped(resumed)
    opt2.load_state_dict(ckpt["optimizer"])
    for _ in range(4, 8):
        opt2.zero_grad()
        _loss(resumed, 0).backward()
        opt2.step()
    _assert_same(resumed, model)
