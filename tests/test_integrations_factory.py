"""lowrank_opt.build: the wrapper from a model and an optimizer class plus keyword arguments."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowrank_opt as lo


def model() -> nn.Module:
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    lo.inject_lora(net, rank=2, alpha=4, target=lambda name, module: name == "0")
    net[2].weight.requires_grad_(True)  # one ordinary trainable parameter beside the pair
    return net


def test_kwargs_are_split_between_the_optimizer_and_the_wrapper():
    net = model()
    opt = lo.build(net, torch.optim.AdamW, lr=3e-3, weight_decay=0.05, max_grad_norm=2.0, schedule="both")
    assert isinstance(opt, lo.LowRankWrapper) and isinstance(opt.base, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["lr"] == 3e-3 and group["weight_decay"] == 0.05
    assert opt.max_grad_norm == 2.0 and len(opt.pairs) == 1
    assert {id(p) for p in group["params"]} == {id(p) for p in net.parameters() if p.requires_grad}
    assert {"max_grad_norm", "schedule", "distributed"} <= lo.factory.wrapper_option_names()


def test_a_dotted_path_a_rule_and_a_partial_as_configuration_files_give_them():
    make = functools.partial(lo.build, optimizer_cls="torch.optim.SGD", lr=0.1, momentum=0.9, rule="generic")
    opt = make(model())
    assert isinstance(opt.base, torch.optim.SGD) and opt.rule.name == "generic"
    loss = opt.pairs[0].a.sum() + opt.pairs[0].b.sum()
    loss.backward()
    opt.step()


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (torch.optim.AdamW, {"lr": 1e-3, "max_grad_nrm": 1.0}, r"AdamW rejected \['lr', 'max_grad_nrm'\]"),
        ("AdamW", {}, "optimizer_cls must be a class or a dotted path like 'torch.optim.AdamW', got 'AdamW'"),
        ("torch.optim.Adamm", {}, "optimizer_cls 'torch.optim.Adamm' cannot be imported"),
        (nn.Linear, {}, "optimizer_cls must be a torch.optim.Optimizer subclass"),
        (lo.LowRankWrapper, {}, r"build\(\) adds the LowRankWrapper itself"),
    ],
)
def test_bad_arguments_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lo.build(model(), cls, **kwargs)


def test_a_model_without_trainable_parameters_is_refused():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no parameter that requires grad"):
        lo.build(frozen, torch.optim.AdamW)


def test_the_core_and_the_integrations_package_import_no_framework():
    code = (
        "import sys, lowrank_opt, lowrank_opt.integrations; "
        "print(sorted(m for m in ('transformers', 'accelerate', 'lightning', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
