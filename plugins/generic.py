r"""The generic rule: any torch optimizer whose state is declared (docs/math.md section 9).

.. math::
    \begin{aligned}
    &\textbf{every step, both factors:}\quad \texttt{p.grad} \leftarrow \hat g
        \quad \text{(the coefficient gradient, } s F \hat g = P_F G)\\
    &\quad \texttt{base.step()} \quad \text{(the optimizer's own code updates its statistics)}\\
    &\quad \text{the inactive factor is put back; the active one keeps its move } \Delta C\\
    &\textbf{after the move, the partner's statistics:}\quad
        z \leftarrow T z \ (\texttt{linear}),\quad v \leftarrow (T \odot T)\, v \ (\texttt{quadratic}),\\
    &\hspace{14em} \text{unchanged } (\texttt{full\_space}),\quad 0 \ (\texttt{reset})
    \end{aligned}

with ``T = Gamma_new^-1 F_new^T F_old``. Every state key of the optimizer must be declared with
:func:`declare`; declarations for ``SGD``, ``Adam``, ``AdamW``, ``NAdam``, ``RAdam``, ``RMSprop``
and ``Adagrad`` ship here, and a subclass inherits the declarations of its bases (the nearest
wins). A key that nothing declares raises ``ValueError`` at the first step, naming the key and
the line to add; the rule never guesses.

How close this is to full fine-tuning depends on the optimizer: a rule linear in the gradient
(SGD, with momentum, dampening, Nesterov) is exactly the projected gradient method, and at full
rank (``W0 = 0``, ``m = n = r``, one factor per step) it is the dense optimizer step for step.
Element-wise second moments (Adam, RMSprop, Adagrad) live on coefficients, not on ``W``, and
``(T * T) v`` re-bases them only approximately; use ``loft_adamw`` for the exact second moment.

Departures: the optimizer's weight decay acts on the factor, which decays ``s B A`` rather than
``W`` (``W0`` is frozen); its step counters advance for both factors every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from lowrank_opt.rule import CalibrationRule, Context, StateKind, Switches, calibrate_state, rescale_state
from lowrank_opt.views import FactorView

__all__ = ["GenericRule", "declare", "declared_kinds"]

_DECLARATIONS: dict[type[Optimizer], dict[str, StateKind]] = {}


def declare(optimizer_type: type[Optimizer], **kinds: StateKind | str) -> None:
    """Declare how state keys of ``optimizer_type`` follow a change of basis.

    Each keyword is a state key, each value a :class:`~lowrank_opt.StateKind` or its name
    (``"linear"``, ``"quadratic"``, ``"full_space"``, ``"reset"``)::

        declare(MyOptimizer, exp_avg="linear", exp_avg_sq="quadratic", step="full_space")

    Declaring a class makes ``rule=None`` pick the generic rule for it (and its subclasses), unless
    a rule with its own update serves it.
    """
    if not (isinstance(optimizer_type, type) and issubclass(optimizer_type, Optimizer)):
        raise ValueError(f"declare() takes a torch.optim.Optimizer subclass, got {optimizer_type!r}")
    parsed = {}
    for key, kind in kinds.items():
        try:
            parsed[key] = StateKind(kind)
        except ValueError:
            choices = ", ".join(k.value for k in StateKind if k is not StateKind.BLOCK)
            raise ValueError(
                f"state key {key!r} of {optimizer_type.__name__}: kind must be one of {choices}, got {kind!r}"
            ) from None
        if parsed[key] is StateKind.BLOCK:
            raise ValueError(
                f"state key {key!r}: 'block' statistics are packed r x r blocks that torch optimizers do not keep"
            )
    _DECLARATIONS.setdefault(optimizer_type, {}).update(parsed)


def declared_kinds(optimizer_type: type[Optimizer]) -> dict[str, StateKind]:
    """Every declared key of ``optimizer_type``, its own declarations winning over its bases'."""
    kinds: dict[str, StateKind] = {}
    for cls in reversed(optimizer_type.__mro__):
        kinds.update(_DECLARATIONS.get(cls, {}))
    return kinds


_STEP = {"step": "full_space"}
_ADAM = {**_STEP, "exp_avg": "linear", "exp_avg_sq": "quadratic", "max_exp_avg_sq": "quadratic"}
declare(torch.optim.SGD, momentum_buffer="linear")
declare(torch.optim.Adam, **_ADAM)
declare(torch.optim.AdamW, **_ADAM)
declare(torch.optim.NAdam, **_STEP, mu_product="full_space", exp_avg="linear", exp_avg_sq="quadratic")
declare(torch.optim.RAdam, **_STEP, exp_avg="linear", exp_avg_sq="quadratic")
declare(torch.optim.RMSprop, **_STEP, square_avg="quadratic", momentum_buffer="linear", grad_avg="linear")
declare(torch.optim.Adagrad, **_STEP, sum="quadratic")


class GenericRule(CalibrationRule):
    """The base optimizer's own ``step()`` on ``g_hat``, its state re-based by declaration."""

    name = "generic"
    reads_base_weight = False
    uses_base_step = True

    def __init__(self, kinds: Mapping[str, StateKind] | None = None, optimizer_name: str = "the optimizer") -> None:
        self._kinds = dict(kinds or {})
        self._optimizer_name = optimizer_name

    @classmethod
    def for_optimizer(cls, optimizer: Optimizer, **options: Any) -> CalibrationRule:
        if options:
            raise TypeError(f"unexpected options {sorted(options)}")
        return cls(declared_kinds(type(optimizer)), type(optimizer).__name__)

    @classmethod
    def serves_optimizer(cls, optimizer_type: type) -> bool:
        """A declared class (its subclasses reach it through the registry's walk of the MRO)."""
        return optimizer_type in _DECLARATIONS

    def check(self, base_optimizer: Optimizer, groups: list[Mapping[str, Any]], switches: Switches) -> None:
        if not switches.project_update:
            raise ValueError(f"{self!r} has no coefficient-space form, so project_update=False is not supported")
        for group in groups:
            self.check_group(group)

    def state_kinds(self) -> Mapping[str, StateKind]:
        return self._kinds

    def calibrate(self, state: dict[str, torch.Tensor], t: torch.Tensor, view: FactorView, ctx: Context) -> None:
        self._check_declared(state)
        calibrate_state(state, self._kinds, t, view, ctx.switches)

    def rescale(self, state: dict[str, torch.Tensor], factor: torch.Tensor, ctx: Context) -> None:
        self._check_declared(state)
        rescale_state(state, self._kinds, factor)

    def _check_declared(self, state: Mapping[str, torch.Tensor]) -> None:
        for key in state:
            if key not in self._kinds:
                raise ValueError(
                    f"generic rule: state key {key!r} of {self._optimizer_name} is not declared, so it cannot be moved "
                    "to the new basis. Declare how it follows a change of basis (linear, quadratic, full_space or "
                    f"reset) before building the wrapper, e.g.\n"
                    f'    lowrank_opt_plugins.generic.declare({self._optimizer_name}, {key}="linear")'
                )
