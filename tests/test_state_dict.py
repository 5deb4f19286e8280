"""Checkpoints: a stopped, saved, rebuilt and resumed run continues bit-identically."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lowrank_opt as lo


def _model(rank: int = 3, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 5))
    lo.inject_lora(model, rank=rank, alpha=6, target=lambda name, module: module.out_features == 12)
    model[2].weight.requires_grad_(True)  # a non-LoRA parameter that the base optimizer steps
    return model.to(dtype)


def _build(model: nn.Module, **options) -> lo.LowRankWrapper:
    params = [p for p in model.parameters() if p.requires_grad]
    return lo.LowRankWrapper(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01), model, max_grad_norm=1.0, **options)


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, 10, generator=gen).to(next(model.parameters()).dtype)
        y = torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rule_options": {"second_moment": "factored"}},
        {"rule_options": {"second_moment": "diagonal"}},
        {"alternate_every": 3},
        {"schedule": "both"},
        {"schedule": "sequential"},
    ],
)
def test_resume_is_bit_identical(options):
    straight = _model()
    opt = _build(straight, **options)
    _run(straight, opt, range(14))

    first = _model()
    opt = _build(first, **options)
    _run(first, opt, range(7))
    checkpoint = _save({"model": first.state_dict(), "optimizer": opt.state_dict()})

    resumed = _model()
    opt = _build(resumed, **options)
    loaded = _load(checkpoint)
    opt.load_state_dict(loaded["optimizer"])  # the optimizer before the model: nothing is flagged
    resumed.load_state_dict(loaded["model"])
    _run(resumed, opt, range(7, 14))
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_state_is_versioned_tensors_with_an_entry_per_factor_before_the_first_step():
    model = _model()
    opt = _build(model)
    state_dict = opt.state_dict()
    assert state_dict["lowrank_opt_version"] == lo.STATE_VERSION
    factor_ids = [
        i
        for i, p in enumerate(opt.param_groups[0]["params"])
        if any(p is f for pair in opt.pairs for f in (pair.a, pair.b))
    ]
    assert len(factor_ids) == 2
    for i in factor_ids:
        assert all(isinstance(v, torch.Tensor) for v in state_dict["state"][i].values())


def test_bfloat16_resume_keeps_float32_statistics_and_step():
    model = _model(dtype=torch.bfloat16)
    opt = _build(model)
    _run(model, opt, range(3))
    loaded = _load(_save(opt.state_dict()))
    again = _model(dtype=torch.bfloat16)
    opt2 = _build(again)
    opt2.load_state_dict(loaded)
    for pair in opt2.pairs:
        state = opt2.state[pair.a]
        assert state["exp_avg"].dtype == torch.float32 and state["lowrank_step"].dtype == torch.int64
        assert state["lowrank_step"].item() == 3


def test_mismatched_checkpoints_are_refused_and_leave_state_untouched():
    model = _model(rank=3)
    opt = _build(model)
    _run(model, opt, range(2))
    other = _model(rank=4)
    other_opt = _build(other)
    _run(other, other_opt, range(2))
    before = _save(opt.state_dict())
    with pytest.raises(ValueError, match=r"saved lowrank_basis_gram is \(4, 4\), expected \(3, 3\)"):
        opt.load_state_dict(other_opt.state_dict())
    factored = _build(_model(rank=3), rule_options={"second_moment": "factored"})
    with pytest.raises(ValueError, match="state dict lacks 'exp_avg_sq' \\(a checkpoint of another rule\\?\\)"):
        opt.load_state_dict(factored.state_dict())
    wrong_version = opt.state_dict() | {"lowrank_opt_version": 99}
    with pytest.raises(ValueError, match="state dict version 99 is not supported"):
        opt.load_state_dict(wrong_version)
    plain = torch.optim.AdamW([p for p in _model(rank=3).parameters() if p.requires_grad])
    with pytest.raises(ValueError, match="state dict has no low-rank state for factor a"):
        opt.load_state_dict(plain.state_dict())
    after = opt.state_dict()
    for key, value in _load(before)["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, after["state"][key][name])
