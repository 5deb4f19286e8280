"""Which factor of a pair moves at a given step (docs/math.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .views import Side

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """``alternate``: ``b`` for ``every`` steps, then ``a`` for ``every`` steps, and so on (``b``
    first, since peft starts ``b`` at zero). ``both``: both factors move every step, each from the
    step's gradient. ``sequential``: both factors move every step, one after the other: ``a``
    moves, then ``b`` moves with its gradient re-expressed in the basis of the moved ``a`` (one
    backward pass gives ``dL/dB`` at the old ``a`` only; docs/math.md section 4).

    The schedule is a pure function of the pair's step counter, which lives in ``state_dict()``,
    so a resumed run continues in the same phase.
    """

    mode: Literal["alternate", "both", "sequential"] = "alternate"
    every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("alternate", "both", "sequential"):
            raise ValueError(f"schedule must be 'alternate', 'both' or 'sequential', got {self.mode!r}")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"alternate_every must be a positive integer, got {self.every!r}")

    def active(self, steps_done: int) -> tuple[Side, ...]:
        """The factors that move at the step after ``steps_done`` completed ones, in order."""
        if self.mode == "both":
            return ("b", "a")
        if self.mode == "sequential":
            return ("a", "b")
        return ("b",) if (steps_done // self.every) % 2 == 0 else ("a",)
