"""The conformance table every rule joins.

Each row is one rule with one base optimizer. Every row must: train a tiny model (LoRA layers and
a plain 2-D weight in the same base optimizer); resume from a checkpoint exactly as an
uninterrupted run; refuse a base optimizer it does not lift. Rows that claim it must also match
their dense optimizer at full rank (``W0 = 0``, ``m = n = r``, float64, 50 alternating steps).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import dense_trajectory, full_weight, lowrank_trajectory, make_pair, max_rel_error, quadratic_loss
from test_muon import DenseMuon
from torch import Tensor, nn

import lowrank_opt as lo

MakeOptimizer = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Row:
    rule: str
    make: MakeOptimizer
    wrong: MakeOptimizer  # a base optimizer the rule must refuse (at construction or first step)
    options: dict[str, Any] = field(default_factory=dict)
    dense: MakeOptimizer | None = None  # the dense optimizer it equals at full rank, if it claims to

    @property
    def id(self) -> str:
        optimizer = type(self.make([nn.Parameter(torch.zeros(2, 2))])).__name__
        extra = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.rule}[{optimizer}{',' + extra if extra else ''}]"


def _adamw(p):
    return torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)


def _adafactor(p):
    return torch.optim.Adafactor(p, lr=1e-2, weight_decay=0.1)


def _muon(p):
    return torch.optim.Muon(p, lr=2e-2, weight_decay=0.1)


def _sgd(p):
    return torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)


ROWS = [
    Row("loft_adamw", _adamw, wrong=_sgd, dense=_adamw),
    Row("loft_adamw", _adamw, wrong=_sgd, options={"second_moment": "factored"}),
    Row("loft_adafactor", _adafactor, wrong=_adamw, dense=_adafactor),
    Row("loft_adafactor", _adafactor, wrong=_adamw, options={"base_norm_every": 3}),
    Row(
        "loft_muon",
        _muon,
        wrong=_adafactor,
        options={"ns_dtype": "float64"},
        dense=lambda p: DenseMuon(p, lr=2e-2, weight_decay=0.1),
    ),
    Row("loft_muon", _muon, wrong=_adafactor),
    Row("generic", _sgd, wrong=_adafactor, dense=_sgd),
    Row("generic", lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True), wrong=_adafactor),
    Row("generic", lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5), wrong=_adafactor),
    Row("generic", lambda p: torch.optim.Adagrad(p, lr=1e-2), wrong=_adafactor),
    Row("generic", lambda p: torch.optim.NAdam(p, lr=1e-2), wrong=_adafactor),
    Row("generic", lambda p: torch.optim.RAdam(p, lr=1e-2), wrong=_adafactor),
]
IDS = [row.id for row in ROWS]

_GEN = torch.Generator().manual_seed(0)
INPUTS, TARGETS = torch.randn(32, 8, generator=_GEN), torch.randn(32, 4, generator=_GEN)


def _tiny_model() -> nn.Module:
    """Two LoRA layers (B = 0 at start) and a trainable plain 2-D head (every parameter 2-D, as Muon needs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4, bias=False))
    lo.inject_lora(model, rank=2, alpha=4, target=lambda name, module: name in ("0", "2"))
    model[4].weight.requires_grad_(True)
    return model


def _build(row: Row) -> tuple[nn.Module, lo.LowRankWrapper]:
    model = _tiny_model()
    base = row.make([p for p in model.parameters() if p.requires_grad])
    return model, lo.LowRankWrapper(base, model, rule=row.rule, rule_options=row.options)


def _train(model: nn.Module, opt: lo.LowRankWrapper, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(INPUTS), TARGETS)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_trains_a_tiny_model(row):
    model, opt = _build(row)
    assert opt.rule.name == row.rule
    losses = _train(model, opt, 12)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_resume_equals_uninterrupted(row):
    model, opt = _build(row)
    _train(model, opt, 6)

    first, first_opt = _build(row)
    _train(first, first_opt, 3)
    checkpoint = copy.deepcopy((first.state_dict(), first_opt.state_dict()))
    resumed, resumed_opt = _build(row)
    resumed.load_state_dict(checkpoint[0])
    resumed_opt.load_state_dict(checkpoint[1])
    _train(resumed, resumed_opt, 3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_wrong_base_optimizer_raises(row):
    model = _tiny_model()
    with pytest.raises(ValueError, match=row.rule):
        opt = lo.LowRankWrapper(
            row.wrong([p for p in model.parameters() if p.requires_grad]),
            model,
            rule=row.rule,
            rule_options=row.options,
        )
        _train(model, opt, 1)


@pytest.mark.parametrize(
    "row", [row for row in ROWS if row.dense is not None], ids=[row.id for row in ROWS if row.dense is not None]
)
def test_full_rank_equivalence(row):
    r = 6
    pair = make_pair(r, r, r, scale=2.0, seed=3)
    loss = quadratic_loss(torch.randn(r, r, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    w0 = full_weight(pair).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no base weight here, as W0 = 0
        opt = lo.LowRankWrapper(row.make([pair.a, pair.b]), [pair], rule=row.rule, rule_options=row.options)
        lowrank = lowrank_trajectory(pair, loss, opt, 50)
    dense = dense_trajectory(w0, loss, row.dense, 50)
    assert max_rel_error(lowrank, dense) < 1e-9


@pytest.mark.parametrize("rule, make", [("loft_adafactor", _adafactor), ("loft_muon", _muon), ("generic", _sgd)])
def test_project_update_off_is_refused_where_the_rule_has_no_coefficient_form(rule, make):
    model = _tiny_model()
    with pytest.raises(ValueError, match="project_update=False"):
        lo.LowRankWrapper(
            make([p for p in model.parameters() if p.requires_grad]), model, rule=rule, project_update=False
        )
