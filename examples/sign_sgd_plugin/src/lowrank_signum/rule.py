r"""LoFT-Signum: :class:`~lowrank_signum.Signum` lifted to LoRA factors.

.. math::
    \begin{aligned}
    &\textbf{every step, both factors } (g = \hat g,\ (r, l)):\quad M \leftarrow \beta M + (1 - \beta) g\\
    &\textbf{active factor:}\quad U = \mathrm{sign}(s F M) \ (k, l), \qquad
      C \leftarrow C (1 - \gamma \lambda) - \gamma\, \Gamma^{-1} F^\top U / s
    \end{aligned}

``s F M`` is the dense momentum buffer seen through the frozen factor, so at full rank
(``W0 = 0``, ``m = n = r``, one factor per step) this is Signum on ``W`` step for step. The sign
is not separable, so ``U`` is formed column block by column block: ``(G, k, c)`` transients with
``G k c <= block_elements``, ``O(k l r)`` time per pair. Every tensor carries the group dimension
``G`` (pairs of equal shape stepped together).

Departures from the dense optimizer: decay multiplies the factor, which decays ``s B A`` rather
than ``W`` (``W0`` is frozen).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lowrank_opt import CalibrationRule, Context, FactorView, StateKind

from .optimizer import Signum


class LoFTSignum(CalibrationRule):
    """LoFT-Signum. ``block_elements`` bounds the ``(G, k, c)`` blocks of the full-space sign."""

    name = "loft_signum"
    serves = (Signum,)

    def __init__(self, block_elements: int = 1 << 22) -> None:
        if not isinstance(block_elements, int) or block_elements < 1:
            raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
        self.block_elements = block_elements

    def state_kinds(self) -> Mapping[str, StateKind]:
        return {"momentum_buffer": StateKind.LINEAR}  # coefficients: re-based as T M

    def init_state(self, view: FactorView, ctx: Context) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(view.canonical(view.coeff))}  # the factor's own orientation

    def observe(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> None:
        buf = view.canonical(state["momentum_buffer"])  # (G, r, l), a view of the state
        buf.lerp_(g_hat.to(buf.dtype), 1 - ctx.hyper("beta"))

    def update(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> Tensor:
        f, s = view.basis, view.scale
        momentum = view.canonical(state["momentum_buffer"]).to(f.dtype)  # (G, r, l)
        members, k, l = f.shape[0], f.shape[1], momentum.shape[-1]
        block = max(1, min(l, self.block_elements // max(members * k, 1)))
        projected = torch.empty_like(momentum)
        for start in range(0, l, block):
            cols = slice(start, start + block)
            u = (f @ momentum[..., cols]).mul_(s).sign_()  # U = sign(s F M): (k, r) @ (r, c) -> (k, c)
            projected[..., cols] = f.transpose(-2, -1) @ u  # (r, k) @ (k, c) -> (r, c)
        return ctx.hyper("lr") * view.coefficients(projected)  # Gamma^-1 F^T U / s; the engine decays and moves
