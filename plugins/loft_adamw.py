r"""LoFT-AdamW: ``torch.optim.AdamW`` lifted to LoRA factors (MATH.md section 6).

.. math::
    \begin{aligned}
    &\textbf{every step, both factors } (g = \hat g,\ (r, l)):\\
    &\quad M \leftarrow \beta_1 M + (1 - \beta_1) g\\
    &\quad Q_j \leftarrow \beta_2 Q_j + (1 - \beta_2)\, g_j g_j^\top \quad \text{for each column } j\\
    &\textbf{active factor } (f_i = \text{row } i \text{ of } F):\\
    &\quad M^{full} = s F M / (1 - \beta_1^t), \qquad V_{ij} = s^2 f_i^\top Q_j f_i / (1 - \beta_2^t)\\
    &\quad U = M^{full} / (\sqrt{V} + \epsilon)\\
    &\quad C \leftarrow C (1 - \gamma \lambda) - \gamma\, \Gamma^{-1} F^\top U / s
    \end{aligned}

At full rank (``W0 = 0``, ``m = n = r``, invertible factors, one factor per step) this is AdamW on
``W`` step for step. ``Q`` is stored packed, ``(l, r (r + 1) / 2)``; ``V`` for a block of ``c``
columns is one GEMM and ``U`` never exceeds ``(k, c)``.

Second-moment modes:

* ``exact``: the per-column ``r x r`` blocks above, re-based as ``Q_j <- T Q_j T^T``.
* ``factored``: row and column mean squares of the full-space gradient ``X = s F g``
  (``O(k + l)`` state, no ``(k, l)`` matrix): ``R_i = s^2 f_i^T g g^T f_i / l + eps^2``,
  ``K_j = s^2 g_j^T Gamma g_j / k + eps^2``, and ``U = M^full * (R_i K_j / mean(R))^-1/2``, so
  ``Gamma^-1 F^T U / s = Gamma^-1 (F^T diag(a) F) M diag(b)``.
* ``diagonal``: a diagonal ``v`` (r, l) in coefficient space, re-based as ``(T * T) v``;
  ``V_ij = s^2 sum_a f_ia^2 v_aj``.

Departures from ``torch.optim.AdamW``: decoupled decay multiplies the factor, which decays
``s B A`` rather than ``W`` (``W0`` is frozen); ``factored`` adds ``eps^2`` inside the square
root instead of ``eps`` outside it (that is what keeps it separable); ``amsgrad`` and
``maximize`` are not supported; ``torch.optim.Adam`` is served only without weight decay (its
decay is an L2 term, not a decoupled one). With ``project_update=False`` the update is Adam in
coefficient space, ``M / (sqrt(diag Q) + eps)``, the ablation without full-space reconstruction.
In ``exact`` mode ``V`` is floored at the Cauchy-Schwarz bound of Adam's moments (see
``_second_moment_floor``): a float32 safeguard that exact arithmetic never triggers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lowrank_opt.linalg import ema_packed_outer_, quadratic_form_rows, triu_indices
from lowrank_opt.rule import CalibrationRule, StateKind, state_dtype
from lowrank_opt.views import FactorView

__all__ = ["LoFTAdamW"]

_MODES = ("exact", "factored", "diagonal")


class LoFTAdamW(CalibrationRule):
    """LoFT-AdamW. ``second_moment`` picks ``exact``, ``factored`` or ``diagonal``;
    ``block_elements`` bounds the ``(k, c)`` transients of the exact evaluation (default: 2^19 on
    CPU, where blocks that stay in cache are fastest, and 2^22 on accelerators, where fewer and
    larger kernels are)."""

    name = "loft_adamw"
    reads_base_weight = False
    serves = (torch.optim.AdamW, torch.optim.Adam)

    def __init__(
        self, second_moment: Literal["exact", "factored", "diagonal"] = "exact", block_elements: int | None = None
    ) -> None:
        if second_moment not in _MODES:
            raise ValueError(f"second_moment must be one of {_MODES}, got {second_moment!r}")
        if block_elements is not None and (not isinstance(block_elements, int) or block_elements < 1):
            raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
        self.second_moment = second_moment
        self.block_elements = block_elements

    def __repr__(self) -> str:
        return f"LoFTAdamW(second_moment={self.second_moment!r})"

    def has_coefficient_form(self) -> bool:
        return self.second_moment != "factored"  # factored statistics live in full space only

    def check_group(self, group: Mapping[str, Any]) -> None:
        for flag in ("amsgrad", "maximize"):
            if group.get(flag, False):
                raise ValueError(f"loft_adamw does not support {flag}=True")
        if group.get("weight_decay", 0) and not group.get("decoupled_weight_decay", False):
            raise ValueError(
                f"loft_adamw: torch.optim.Adam's weight_decay={group['weight_decay']} is a coupled L2 term; "
                "use torch.optim.AdamW (decoupled) or weight_decay=0"
            )

    def state_kinds(self) -> Mapping[str, StateKind]:
        if self.second_moment == "exact":
            return {"exp_avg": StateKind.LINEAR, "exp_avg_sq": StateKind.BLOCK}
        if self.second_moment == "factored":
            return {
                "exp_avg": StateKind.LINEAR,
                "exp_avg_sq_row": StateKind.FULL_SPACE,
                "exp_avg_sq_col": StateKind.FULL_SPACE,
            }
        return {"exp_avg": StateKind.LINEAR, "exp_avg_sq": StateKind.QUADRATIC}

    def init_state(self, view: FactorView, group: Mapping[str, Any]) -> dict[str, Tensor]:
        p = view.param
        r, l = view.coeff.shape

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=state_dtype(p), device=p.device)

        state = {"exp_avg": zeros(*p.shape)}
        if self.second_moment == "exact":
            state["exp_avg_sq"] = zeros(l, r * (r + 1) // 2)
        elif self.second_moment == "factored":
            m, n = view.full_shape
            state["exp_avg_sq_row"] = zeros(m)
            state["exp_avg_sq_col"] = zeros(n)
        else:
            state["exp_avg_sq"] = zeros(*p.shape)
        return state

    def observe(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        g = g_hat.to(state["exp_avg"].dtype)
        view.canonical(state["exp_avg"]).lerp_(g, 1 - beta1)
        if self.second_moment == "exact":
            r = g.shape[0]
            block = max(1, self._block_elements(g.device) // (r * (r + 1) // 2))
            ema_packed_outer_(state["exp_avg_sq"], g, triu_indices(r, g.device), beta2, block)
        elif self.second_moment == "diagonal":
            view.canonical(state["exp_avg_sq"]).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        else:
            rows, cols = _factored_stats(state, view)
            eps2 = float(group["eps"]) ** 2
            row_sq, col_sq = view.full_mean_squares(g.to(view.gram.dtype))
            rows.lerp_((row_sq + eps2).to(rows.dtype), 1 - beta2)
            cols.lerp_((col_sq + eps2).to(cols.dtype), 1 - beta2)

    def update(
        self, state: dict[str, Any], g_hat: Tensor, view: FactorView, group: Mapping[str, Any], step: int
    ) -> Tensor:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        dtype = view.gram.dtype
        m_hat = view.canonical(state["exp_avg"]).to(dtype) / bc1  # (r, l)
        if not self.switches.project_update:
            direction = m_hat / (self._coefficient_second_moment(state, view).div(bc2).sqrt() + eps)
        elif self.second_moment == "factored":
            direction = self._factored_direction(state, view, m_hat, bc2)
        else:
            floor = _second_moment_floor(beta1, beta2, step) if self._bound_holds() else None
            direction = self._projected_direction(state, view, m_hat, bc2, eps, floor)
        return -lr * wd * view.coeff.to(dtype) - lr * direction

    def _bound_holds(self) -> bool:
        """The Cauchy-Schwarz floor is a theorem only when ``M`` and ``Q`` move with the same ``T``."""
        sw = self.switches
        return self.second_moment == "exact" and sw.calibrate_first_moment == sw.calibrate_second_moment

    def _block_elements(self, device: torch.device) -> int:
        if self.block_elements is not None:
            return self.block_elements
        return 1 << 19 if device.type == "cpu" else 1 << 22

    def _coefficient_second_moment(self, state: dict[str, Any], view: FactorView) -> Tensor:
        """``diag(Q_j)`` (exact) or ``v`` (diagonal) as ``(r, l)``."""
        dtype = view.gram.dtype
        if self.second_moment == "exact":
            r = view.coeff.shape[0]
            triu = triu_indices(r, view.gram.device)
            diagonal = (triu[0] == triu[1]).nonzero().squeeze(1)
            return state["exp_avg_sq"][:, diagonal].T.to(dtype)
        return view.canonical(state["exp_avg_sq"]).to(dtype)

    def _projected_direction(
        self, state: dict[str, Any], view: FactorView, m_hat: Tensor, bc2: float, eps: float, floor: float | None
    ) -> Tensor:
        """``Gamma^-1 F^T U / s`` with ``U = s F M_hat / (sqrt(s^2 V / bc2) + eps)``, column block by block.

        With ``floor``, ``V / bc2`` is raised to ``floor * (f_i^T M_hat_j)^2`` where it falls below:
        see :func:`_second_moment_floor`."""
        f, s = view.basis, view.scale
        if self.second_moment == "exact":
            rows = quadratic_form_rows(f, triu_indices(f.shape[1], f.device))  # (k, P)
            stats = state["exp_avg_sq"]  # (l, P)
        else:
            rows = f * f  # (k, r)
            stats = view.canonical(state["exp_avg_sq"]).T  # (l, r)
        k, l = f.shape[0], m_hat.shape[1]
        block = max(1, min(l, self._block_elements(f.device) // max(k, 1)))
        out = torch.empty_like(m_hat)
        for start in range(0, l, block):
            cols = slice(start, start + block)
            first = f @ m_hat[:, cols]  # (k, r) @ (r, c) -> (k, c)
            denom = (rows @ stats[cols].T.to(rows.dtype)).div_(bc2)  # (k, q) @ (q, c) -> (k, c)
            if floor is not None:
                torch.maximum(denom, first.square().mul_(floor), out=denom)
            denom.clamp_(min=0).sqrt_().mul_(s).add_(eps)
            u = first.mul_(s).div_(denom)
            out[:, cols] = f.T @ u  # (r, k) @ (k, c) -> (r, c)
        return view.solve(out) / s

    def _factored_direction(self, state: dict[str, Any], view: FactorView, m_hat: Tensor, bc2: float) -> Tensor:
        """``Gamma^-1 (F^T diag(a) F) M_hat diag(b)`` with ``a = (R_hat / mean R_hat)^-1/2``, ``b = K_hat^-1/2``."""
        rows, cols = _factored_stats(state, view)
        dtype = view.gram.dtype
        r_hat, k_hat = rows.to(dtype) / bc2, cols.to(dtype) / bc2
        a = (r_hat / r_hat.mean()).rsqrt()  # (k,)
        b = k_hat.rsqrt()  # (l,)
        weighted = view.basis.T @ (a[:, None] * view.basis)  # (r, k) @ (k, r) -> (r, r)
        return view.solve(weighted @ m_hat) * b


def _second_moment_floor(beta1: float, beta2: float, step: int) -> float | None:
    """``c`` with ``V_hat >= c M_hat^2`` entry by entry, a theorem of Adam's moments.

    By Cauchy-Schwarz over the past gradients, ``(f^T M)^2 <= K_t f^T Q f`` with
    ``K_t = (1 - b1)^2 / (1 - b2) * sum_{u < t} (b1^2 / b2)^u``, so after bias correction
    ``V_hat >= M_hat^2 (1 - b1^t)^2 / (K_t (1 - b2^t))``. Exact arithmetic never needs it, but in
    float32 the quadratic form ``f_i^T Q_j f_i`` cancels where ``f_i^T g_j`` nearly vanishes and can
    round to zero, which would make ``U`` as large as ``M / eps`` (hundreds of times AdamW's bound).
    """
    if beta2 <= 0.0:
        return None
    rho = beta1 * beta1 / beta2
    partial = step if rho == 1.0 else (1.0 - rho**step) / (1.0 - rho)
    k_t = (1.0 - beta1) ** 2 / (1.0 - beta2) * partial
    return (1.0 - beta1**step) ** 2 / (k_t * (1.0 - beta2**step))


def _factored_stats(state: dict[str, Any], view: FactorView) -> tuple[Tensor, Tensor]:
    """Row and column statistics in canonical orientation, ``(k,)`` and ``(l,)``."""
    rows, cols = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    return (cols, rows) if view.transposed else (rows, cols)
