"""The plugin contract: a calibration rule lifts one optimizer to the factors of LoRA pairs.

A rule supplies four things, each in canonical coordinates of a :class:`~lowrank_opt.views.FactorView`
(``C`` (r, l) over the frozen basis ``F`` (k, r)):

* :meth:`CalibrationRule.init_state`: the statistics of one factor, as tensors;
* :meth:`CalibrationRule.observe`: fold in the coefficient gradient ``g_hat`` (every step, both factors);
* :meth:`CalibrationRule.update`: the coefficient change ``delta_C`` of the active factor (it also
  gets this step's ``g_hat``);
* :meth:`CalibrationRule.state_kinds`: how each statistic moves when the basis changes
  (:class:`StateKind`); :meth:`CalibrationRule.calibrate` applies it and rarely needs overriding.

Rules with ``uses_base_step = True`` instead let the base optimizer's own ``step()`` move the
active factor on ``g_hat`` and only declare their state kinds (MATH.md section 9).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from .linalg import congruence_packed, triu_indices
from .views import FactorView

__all__ = ["StateKind", "Switches", "CalibrationRule", "calibrate_state"]

# Elements of the unpacked (c, r, r) transient while packed blocks are calibrated.
_CALIBRATION_ELEMENTS = 1 << 20


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


def calibrate_state(
    state: dict[str, Any],
    kinds: Mapping[str, StateKind],
    t: Tensor,
    view: FactorView,
    switches: Switches,
) -> None:
    """Move every declared statistic of one factor to its new basis (MATH.md section 3), in place."""
    for key, kind in kinds.items():
        value = state.get(key)
        if not isinstance(value, Tensor):
            continue
        if kind is StateKind.LINEAR and switches.calibrate_first_moment:
            z = view.canonical(value)
            z.copy_(t.to(z.dtype) @ z)
        elif kind is StateKind.QUADRATIC and switches.calibrate_second_moment:
            v = view.canonical(value)
            v.copy_((t * t).to(v.dtype) @ v)
        elif kind is StateKind.BLOCK and switches.calibrate_second_moment:
            r = t.shape[0]
            congruence_packed(value, t, triu_indices(r, t.device), max(1, _CALIBRATION_ELEMENTS // (r * r)))
        elif kind is StateKind.RESET:
            value.zero_()


class CalibrationRule:
    """Base class of every rule. Subclasses set ``name`` and ``serves`` and implement the methods.

    ``serves`` lists the base optimizer classes whose semantics the rule lifts; the wrapper
    refuses any other. Hyperparameters are read from the base optimizer's param group at every
    step, so LR schedulers and manual changes keep working.
    """

    name: ClassVar[str] = ""
    serves: ClassVar[tuple[type[Optimizer], ...]] = ()
    uses_base_step: ClassVar[bool] = False
    # Whether the rule reads ``pair.base_weight`` (W0); sharded strategies gather it only then.
    reads_base_weight: ClassVar[bool] = True

    switches: Switches = Switches()

    def bind(self, base_optimizer: Optimizer, switches: Switches) -> None:
        """Check the base optimizer and the switches; called once by the wrapper."""
        if not isinstance(base_optimizer, self.serves):
            served = ", ".join(cls.__name__ for cls in self.serves) or "nothing"
            raise ValueError(
                f"rule {self.name!r} lifts {served}, not {type(base_optimizer).__name__}; pass rule=None "
                "to pick the rule registered for this optimizer"
            )
        for group in base_optimizer.param_groups:
            self.check_group(group)
        self.check_switches(switches)
        self.switches = switches

    def check_switches(self, switches: Switches) -> None:
        """Refuse ``project_update=False`` for a rule with no update in coefficient space."""
        if not switches.project_update and not self.has_coefficient_form():
            raise ValueError(f"{self!r} has no coefficient-space form, so project_update=False is not supported")

    def has_coefficient_form(self) -> bool:
        """Whether the rule can update without the full-space reconstruction (``project_update=False``)."""
        return False

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for hyperparameters the rule cannot honour."""

    def state_kinds(self) -> Mapping[str, StateKind]:
        raise NotImplementedError

    def init_state(self, view: FactorView, group: Mapping[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    def observe(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> None:
        raise NotImplementedError

    def update(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> Tensor:
        raise NotImplementedError

    def calibrate(self, state: dict[str, Any], t: Tensor, view: FactorView) -> None:
        """Called on a factor's statistics after its basis (the partner) moved; ``t`` is ``T``."""
        calibrate_state(state, self.state_kinds(), t, view, self.switches)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def state_dtype(param: Tensor) -> torch.dtype:
    """Statistics are float32 for half-precision factors and follow wider factors."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32
