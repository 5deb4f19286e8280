"""lowrank_opt.advice: each measured-bad setting warned about once, silenceable, and silent when fine."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowrank_opt as lo
from lowrank_opt.advice import EXACT_CPU_MAX_PAIRS, LowRankAdviceWarning, advise


def _pairs(count: int) -> list[lo.LoRAPair]:
    return [
        lo.LoRAPair(nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.randn(5, 2)), 1.0, name=f"p{i}")
        for i in range(count)
    ]


def _params(pairs: list[lo.LoRAPair]) -> list[nn.Parameter]:
    return [f for pair in pairs for f in (pair.a, pair.b)]


def _advice(*args, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        advise(*args, **kwargs)
    assert all(issubclass(w.category, LowRankAdviceWarning) for w in caught)
    return [str(w.message) for w in caught]


def test_adafactor_at_its_default_lr_warned_once() -> None:
    pairs = _pairs(2)
    opt = torch.optim.Adafactor(_params(pairs))
    seen: set[str] = set()
    (message,) = _advice(opt, "loft_adafactor", {}, pairs, seen)
    assert "default lr=0.01" in message and "4.17 -> 4.45" in message and "lr=0.003" in message
    assert _advice(opt, "loft_adafactor", {}, pairs, seen) == []  # once per wrapper
    assert len(_advice(opt, "loft_adafactor", {}, pairs, set())) == 1  # another wrapper warns again


@pytest.mark.parametrize("lr", [3e-3, 1e-3, torch.tensor(3e-3)])
def test_adafactor_at_another_lr_is_fine(lr: float) -> None:
    pairs = _pairs(2)
    assert _advice(torch.optim.Adafactor(_params(pairs), lr=lr), "loft_adafactor", {}, pairs, set()) == []


def test_adafactor_default_lr_only_on_the_groups_of_the_factors() -> None:
    pairs = _pairs(1)
    head = nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.Adafactor([{"params": _params(pairs), "lr": 3e-3}, {"params": [head]}])
    assert _advice(opt, "loft_adafactor", {}, pairs, set()) == []
    opt = torch.optim.Adafactor([{"params": _params(pairs)}, {"params": [head], "lr": 3e-3}])
    assert len(_advice(opt, "loft_adafactor", {}, pairs, set())) == 1


def test_adafactor_lr_under_another_rule_is_not_judged() -> None:
    pairs = _pairs(1)
    assert _advice(torch.optim.Adafactor(_params(pairs)), "generic", {}, pairs, set()) == []


def test_exact_with_many_pairs_on_cpu_warned_once() -> None:
    pairs = _pairs(EXACT_CPU_MAX_PAIRS + 1)
    opt = torch.optim.AdamW(_params(pairs), lr=1e-3)
    seen: set[str] = set()
    (message,) = _advice(opt, "loft_adamw", {}, pairs, seen)  # exact is the rule's default
    assert f"{EXACT_CPU_MAX_PAIRS + 1} pairs" in message and "factored" in message and "3.662" in message
    assert _advice(opt, "loft_adamw", {"second_moment": "exact"}, pairs, seen) == []


@pytest.mark.parametrize(
    "count, options",
    [
        (EXACT_CPU_MAX_PAIRS, {}),
        (EXACT_CPU_MAX_PAIRS + 1, {"second_moment": "factored"}),
        (EXACT_CPU_MAX_PAIRS + 1, {"second_moment": "diagonal"}),
    ],
)
def test_exact_advice_not_given_when_fine(count: int, options: dict) -> None:
    pairs = _pairs(count)
    assert _advice(torch.optim.AdamW(_params(pairs)), "loft_adamw", options, pairs, set()) == []


def test_both_warnings_silenced_by_category_and_by_flag() -> None:
    pairs = _pairs(EXACT_CPU_MAX_PAIRS + 1)
    adafactor = torch.optim.Adafactor(_params(pairs))
    adamw = torch.optim.AdamW(_params(pairs))
    assert _advice(adafactor, "loft_adafactor", {}, pairs, set(), enabled=False) == []
    assert _advice(adamw, "loft_adamw", {}, pairs, set(), enabled=False) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=lo.LowRankAdviceWarning)  # the documented line
        advise(adafactor, "loft_adafactor", {}, pairs, set())
        advise(adamw, "loft_adamw", {}, pairs, set())
    assert caught == []


def test_warning_is_a_user_warning() -> None:
    assert issubclass(lo.LowRankAdviceWarning, UserWarning)


class _Builds:
    """Stands for a wrapper: advise() is called from its constructor."""

    def __init__(self, opt: torch.optim.Optimizer, pairs: list[lo.LoRAPair]) -> None:
        advise(opt, "loft_adafactor", {}, pairs, set())


def test_warning_points_at_the_code_that_built_the_wrapper() -> None:
    pairs = _pairs(1)
    opt = torch.optim.Adafactor(_params(pairs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _Builds(opt, pairs)
    assert caught[0].filename == __file__
    assert caught[0].lineno == test_warning_points_at_the_code_that_built_the_wrapper.__code__.co_firstlineno + 5
