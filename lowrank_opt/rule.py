"""The plugin contract: a calibration rule lifts one optimizer to the factors of LoRA pairs.

A rule works on a *group*: ``G`` pairs of equal shape whose same factor moves this step, seen
through a :class:`~lowrank_opt.views.FactorView` (coefficients ``C`` (G, r, l) over frozen bases
``F`` (G, k, r)) with every statistic stacked as ``(G, ...)``. It supplies:

* :meth:`CalibrationRule.state_kinds`: how each statistic moves when the basis changes
  (:class:`StateKind`); the engine applies it (:func:`calibrate_state`);
* :meth:`CalibrationRule.init_state`: the statistics of one factor of every member, as tensors;
* :meth:`CalibrationRule.observe`: fold in the coefficient gradient ``g_hat`` (every step, both factors);
* :meth:`CalibrationRule.update`: the step ``Delta`` of the active factor, its own learning rate
  included, such that the engine moves ``C <- C (1 - lr wd) - Delta``;
* optionally, :meth:`CalibrationRule.record_base_products`: the frozen weight's ``||W0||^2`` and
  ``<W0, B A>`` every ``base_products_every`` steps, read block by block (never ``W0`` whole).

Hyperparameters arrive in an immutable :class:`Context`. The engine owns everything else: the
gradient lift, clipping, decoupled decay, the move, the transport ``T`` and the calibration of the
partner (docs/math.md sections 2-4). Rules with ``uses_base_step = True`` instead let the base
optimizer's own ``step()`` move the active factor on ``g_hat`` and only declare their state
kinds (docs/math.md section 9).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .linalg import congruence_packed_, triu_indices
from .views import FactorView

__all__ = ["StateKind", "Switches", "Context", "CalibrationRule", "calibrate_state", "rescale_state"]


class StateKind(str, enum.Enum):
    """How a statistic kept in coefficient coordinates follows a change of basis ``T`` (r, r)."""

    LINEAR = "linear"  # Z <- T Z               first moments, momentum buffers
    QUADRATIC = "quadratic"  # v <- (T * T) v      diagonal second moments (an approximation)
    BLOCK = "block"  # Q_j <- T Q_j T^T          packed per-column r x r second moments (l, P)
    FULL_SPACE = "full_space"  # unchanged        statistics kept in full space, counters
    RESET = "reset"  # zeroed                     statistics that cannot be moved


@dataclass(frozen=True)
class Switches:
    """The building blocks that the ablations turn off one at a time."""

    rescale_grad: bool = True
    calibrate_first_moment: bool = True
    calibrate_second_moment: bool = True
    project_update: bool = True


@dataclass(frozen=True)
class Context:
    """What a rule may read at one step of one group; it never changes it.

    Attributes:
        group: the param group's hyperparameters (a read-only mapping; ``lr`` and the rest as the
            base optimizer holds them, so LR schedulers act here).
        step: ``(G,)`` float tensor, on the factors' device and in the compute dtype: the step
            each member is taking (1 at the first), for bias corrections.
        switches: the ablation switches of the wrapper.
    """

    group: Mapping[str, Any]
    step: Tensor
    switches: Switches

    @staticmethod
    def of(group: Mapping[str, Any], step: Tensor, switches: Switches) -> Context:
        return Context(MappingProxyType(dict(group)), step, switches)

    def hyper(self, key: str) -> float:
        """A scalar hyperparameter as a float (torch allows tensors for ``lr``)."""
        value = self.group[key]
        return float(value.item() if isinstance(value, Tensor) else value)

    def per_member(self) -> Tensor:
        """``step`` shaped ``(G, 1, 1)``, to broadcast against stacked matrices."""
        return self.step[:, None, None]


def calibrate_state(
    state: Mapping[str, Tensor], kinds: Mapping[str, StateKind], t: Tensor, view: FactorView, switches: Switches
) -> None:
    """Move every declared statistic of one factor of a group to its new basis (docs/math.md section 3), in place.

    ``state`` holds stacked ``(G, ...)`` statistics; ``t`` is ``T`` (G, r, r).
    """
    for key, kind in kinds.items():
        value = state.get(key)
        if value is None:
            continue
        if kind is StateKind.LINEAR and switches.calibrate_first_moment:
            z = view.canonical(value)
            z.copy_(torch.bmm(t.to(z.dtype), z))
        elif kind is StateKind.QUADRATIC and switches.calibrate_second_moment:
            v = view.canonical(value)
            v.copy_(torch.bmm((t * t).to(v.dtype), v))
        elif kind is StateKind.BLOCK and switches.calibrate_second_moment:
            r = t.shape[-1]
            block = max(1, view.transient_elements() // (t.shape[0] * r * r))  # (G, c, r, r) unpacked
            congruence_packed_(value, t, triu_indices(r, t.device), block)
        elif kind is StateKind.RESET:
            value.zero_()


def rescale_state(state: Mapping[str, Tensor], kinds: Mapping[str, StateKind], factor: Tensor) -> None:
    """Statistics of one factor of a group whose coefficients were multiplied by ``factor`` (G,).

    The change of basis ``T = factor I``: linear statistics scale by ``factor``, quadratic and
    block ones by ``factor^2`` (exactly: a scalar ``T`` is where the diagonal re-basing is exact),
    full-space ones not at all, and reset ones are zeroed where ``factor != 1``.
    """
    for key, kind in kinds.items():
        value = state.get(key)
        if value is None or kind is StateKind.FULL_SPACE:
            continue
        f = factor.to(value.dtype).reshape(-1, *([1] * (value.ndim - 1)))
        if kind is StateKind.LINEAR:
            value.mul_(f)
        elif kind in (StateKind.QUADRATIC, StateKind.BLOCK):
            value.mul_(f * f)
        else:
            value.mul_((f == 1).to(value.dtype))


class CalibrationRule:
    """Base class of every rule. Subclasses set ``name`` and ``serves`` and implement the methods.

    ``serves`` lists the base optimizer classes whose semantics the rule lifts; the wrapper
    refuses any other. A rule instance is built for one wrapper and is not changed by it.
    """

    name: ClassVar[str] = ""
    serves: ClassVar[tuple[type[Optimizer], ...]] = ()
    uses_base_step: ClassVar[bool] = False
    # Whether the rule reads the frozen base weight (W0) whole, through FactorView.base_matrices();
    # sharded strategies gather it only then.
    reads_base_weight: ClassVar[bool] = True
    # Every how many steps of a pair the rule wants ||W0||^2 and <W0, B A> (record_base_products);
    # None: never. Strategies compute them from shards, never gathering W0.
    base_products_every: int | None = None

    @classmethod
    def for_optimizer(cls, optimizer: Optimizer, **options: Any) -> CalibrationRule:
        """The rule instance for ``optimizer``; rules that depend on its class override this."""
        return cls(**options)

    def check(self, base_optimizer: Optimizer, groups: list[Mapping[str, Any]], switches: Switches) -> None:
        """Refuse a base optimizer, param groups (those holding LoRA factors) or switches the rule cannot honour."""
        if not isinstance(base_optimizer, self.serves):
            served = ", ".join(cls.__name__ for cls in self.serves) or "nothing"
            raise ValueError(
                f"rule {self.name!r} lifts {served}, not {type(base_optimizer).__name__}; pass rule=None "
                "to pick the rule registered for this optimizer"
            )
        for group in groups:
            self.check_group(group)
        if not switches.project_update and not self.has_coefficient_form():
            raise ValueError(f"{self!r} has no coefficient-space form, so project_update=False is not supported")

    def has_coefficient_form(self) -> bool:
        """Whether the rule can update without the full-space reconstruction (``project_update=False``)."""
        return False

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for hyperparameters the rule cannot honour (also checked at every step)."""

    def state_kinds(self) -> Mapping[str, StateKind]:
        raise NotImplementedError

    def init_state(self, view: FactorView, ctx: Context) -> dict[str, Tensor]:
        """Zeroed statistics ``(G, ...)`` of the factor ``view.side`` of every member.

        Statistics are kept in the compute dtype (``view.coeff.dtype``: float32 for half-precision
        factors, float64 for float64 ones), on the factors' device."""
        raise NotImplementedError

    def record_base_products(
        self, state: dict[str, Tensor], products: Tensor, fresh: Tensor, view: FactorView, ctx: Context
    ) -> None:
        """Called for both factors of a group, before :meth:`observe`, at a step where some members'
        base products were computed (see ``base_products_every``): ``products`` (G, 2) holds
        ``(||W0||^2, <W0, B A>)`` from the factors before this step, valid where ``fresh`` (G,) is
        true (a member due now that has a base weight)."""

    def observe(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> None:
        """Fold ``g_hat`` (G, r, l) into the statistics, in place."""
        raise NotImplementedError

    def update(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> Tensor:
        """The step ``Delta`` (G, r, l), learning rate included: the engine sets ``C <- C (1 - lr wd) - Delta``."""
        raise NotImplementedError

    def calibrate(self, state: dict[str, Tensor], t: Tensor, view: FactorView, ctx: Context) -> None:
        """Called on a factor's statistics after its basis (the partner) moved; ``t`` is ``T`` (G, r, r)."""
        calibrate_state(state, self.state_kinds(), t, view, ctx.switches)

    def rescale(self, state: dict[str, Tensor], factor: Tensor, ctx: Context) -> None:
        """Called on a factor's statistics after its coefficients were multiplied by ``factor`` (G,)."""
        rescale_state(state, self.state_kinds(), factor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
