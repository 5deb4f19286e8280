"""Rules are found through the ``lowrank_opt.rules`` entry-point group.

The built-in rules register themselves there exactly as a third-party package would, so the
core never imports a plugin by name. A package adds a rule with, in its ``pyproject.toml``::

    [project.entry-points."lowrank_opt.rules"]
    my_rule = "my_package.my_module:MyRule"
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from torch.optim import Optimizer

from .rule import CalibrationRule

__all__ = ["ENTRY_POINT_GROUP", "available_rules", "rule_for", "resolve_rule"]

ENTRY_POINT_GROUP = "lowrank_opt.rules"


@functools.cache
def available_rules() -> Mapping[str, type[CalibrationRule]]:
    """Every registered rule class, by entry-point name.

    An entry point that fails to import, or names something that is not a rule, is skipped with a
    warning naming it: one broken plugin does not take the other rules down with it."""
    rules: dict[str, type[CalibrationRule]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001 - any failure of a third-party import is reported, not raised
            warnings.warn(f"rule {ep.name!r} ({ep.value}) could not be loaded and is skipped: {err!r}", stacklevel=2)
            continue
        if not (isinstance(cls, type) and issubclass(cls, CalibrationRule)):
            warnings.warn(
                f"rule {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP!r} is not a CalibrationRule subclass and is skipped",
                stacklevel=2,
            )
            continue
        rules[ep.name] = cls
    return rules


def _serves(cls: type[CalibrationRule], optimizer_type: type) -> bool:
    serves = getattr(cls, "serves_optimizer", None)
    return bool(serves(optimizer_type)) if serves is not None else optimizer_type in cls.serves


def rule_for(optimizer: Optimizer) -> type[CalibrationRule]:
    """The rule registered for ``type(optimizer)``: the nearest class in its MRO wins, and a rule
    with its own update beats one that delegates to the base optimizer's ``step()``."""
    rules = available_rules()
    for optimizer_type in type(optimizer).__mro__:
        matches = [cls for cls in rules.values() if _serves(cls, optimizer_type)]
        if matches:
            return min(matches, key=lambda cls: (cls.uses_base_step, cls.name))
    listing = ", ".join(
        f"{name} ({', '.join(c.__name__ for c in cls.serves) or 'declared optimizers'})"
        for name, cls in sorted(rules.items())
    )
    raise ValueError(f"no rule is registered for {type(optimizer).__name__}; registered rules: {listing or 'none'}")


def resolve_rule(
    rule: CalibrationRule | str | type[CalibrationRule] | None,
    optimizer: Optimizer,
    options: Mapping[str, Any] | None,
) -> CalibrationRule:
    """A rule instance from ``None`` (chosen by the optimizer's class), a registered name, a class or an instance."""
    options = dict(options or {})
    if isinstance(rule, CalibrationRule):
        if options:
            raise ValueError(
                "rule_options are given to the rule's constructor; pass them there when rule is an instance"
            )
        return rule
    if rule is None:
        cls = rule_for(optimizer)
    elif isinstance(rule, str):
        rules = available_rules()
        if rule not in rules:
            raise ValueError(f"unknown rule {rule!r}; registered rules: {', '.join(sorted(rules)) or 'none'}")
        cls = rules[rule]
    elif isinstance(rule, type) and issubclass(rule, CalibrationRule):
        cls = rule
    else:
        raise ValueError(f"rule must be None, a registered name, a CalibrationRule class or instance, got {rule!r}")
    try:
        return cls.for_optimizer(optimizer, **options)
    except TypeError as err:
        raise ValueError(f"rule {cls.name or cls.__name__!r} does not accept rule_options {options}: {err}") from None
