r"""LoFT-Signum: :class:`~lowrank_signum.Signum` lifted to LoRA factors.

.. math::
    \begin{aligned}
    &\textbf{every step, both factors } (g = \hat g,\ (r, l)):\quad M \leftarrow \beta M + (1 - \beta) g\\
    &\textbf{active factor:}\quad U = \mathrm{sign}(s F M) \ (k, l), \qquad
      C \leftarrow C (1 - \gamma \lambda) - \gamma\, \Gamma^{-1} F^\top U / s
    \end{aligned}

``s F M`` is the dense momentum buffer seen through the frozen factor, so at full rank
(``W0 = 0``, ``m = n = r``, one factor per step) this is Signum on ``W`` step for step. The sign
is not separable, so ``U`` is formed column block by column block: ``(k, c)`` transients with
``k c <= block_elements``, ``O(k l r)`` time.

Departures from the dense optimizer: decay multiplies the factor, which decays ``s B A`` rather
than ``W`` (``W0`` is frozen).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lowrank_opt import CalibrationRule, FactorView, StateKind, state_dtype

from .optimizer import Signum


class LoFTSignum(CalibrationRule):
    """LoFT-Signum. ``block_elements`` bounds the ``(k, c)`` blocks of the full-space sign."""

    name = "loft_signum"
    serves = (Signum,)

    def __init__(self, block_elements: int = 1 << 22) -> None:
        if not isinstance(block_elements, int) or block_elements < 1:
            raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
        self.block_elements = block_elements

    def state_kinds(self) -> Mapping[str, StateKind]:
        return {"momentum_buffer": StateKind.LINEAR}  # coefficients: re-based as T M

    def init_state(self, view: FactorView, group: Mapping[str, Any]) -> dict[str, Tensor]:
        p = view.param
        return {"momentum_buffer": torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)}

    def observe(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> None:
        buf = view.canonical(state["momentum_buffer"])  # (r, l), a view of the state
        buf.lerp_(g_hat.to(buf.dtype), 1 - group["beta"])

    def update(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> Tensor:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        f, s = view.basis, view.scale
        momentum = view.canonical(state["momentum_buffer"]).to(f.dtype)  # (r, l)
        k, l = f.shape[0], momentum.shape[1]
        block = max(1, min(l, self.block_elements // max(k, 1)))
        projected = torch.empty_like(momentum)
        for start in range(0, l, block):
            cols = slice(start, start + block)
            u = (f @ momentum[:, cols]).mul_(s).sign_()  # U = sign(s F M): (k, r) @ (r, c) -> (k, c)
            projected[:, cols] = f.T @ u  # (r, k) @ (k, c) -> (r, c)
        direction = view.solve(projected) / s  # Gamma^-1 F^T U / s
        return -lr * wd * view.coeff.to(f.dtype) - lr * direction
