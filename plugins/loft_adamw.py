r"""LoFT-AdamW: ``torch.optim.AdamW`` lifted to LoRA factors (docs/math.md section 6).

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
``second_moment_floor``): a float32 safeguard that exact arithmetic never triggers.

Each mode is a small strategy object (:class:`ExactSecondMoment`, :class:`FactoredSecondMoment`,
:class:`DiagonalSecondMoment`) holding its statistics, how they are observed and how they turn
the first moment into a direction; every tensor carries the group dimension ``G``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from lowrank_opt.linalg import ema_packed_outer_, quadratic_form_rows, triu_indices
from lowrank_opt.rule import CalibrationRule, Context, StateKind
from lowrank_opt.views import FactorView

__all__ = ["LoFTAdamW", "ExactSecondMoment", "FactoredSecondMoment", "DiagonalSecondMoment", "second_moment_floor"]


def second_moment_floor(beta1: float, beta2: float, step: Tensor) -> Tensor | None:
    """``c`` (shaped like ``step``) with ``V_hat >= c M_hat^2`` entry by entry, a theorem of Adam's moments.

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


def _zeros(view: FactorView, *shape: int) -> Tensor:
    return torch.zeros((view.coeff.shape[0], *shape), dtype=view.coeff.dtype, device=view.coeff.device)


def _matrix_shape(view: FactorView) -> tuple[int, int]:
    """The factor's matrix shape in its own orientation: ``(r, n)`` for ``a``, ``(m, r)`` for ``b``."""
    r, l = view.coeff.shape[-2:]
    return (r, l) if view.side == "a" else (l, r)


def projected_direction(
    view: FactorView,
    m_hat: Tensor,
    rows: Tensor,
    stats: Tensor,
    bc2: Tensor,
    eps: float,
    floor: Tensor | None,
    block_elements: int,
) -> Tensor:
    """``Gamma^-1 F^T U / s`` with ``U = s F M_hat / (sqrt(s^2 (rows @ stats^T) / bc2) + eps)``, column block by column block.

    ``rows`` (G, k, q) and ``stats`` (G, l, q) factor the second moment ``V = rows @ stats^T``; with
    ``floor`` (G, 1, 1), ``V / bc2`` is raised to ``floor * (f_i^T M_hat_j)^2`` where it falls below
    (:func:`second_moment_floor`). Transients stay ``(G, k, c)`` with ``G k c <= block_elements``.
    """
    f, s = view.basis, view.scale
    g, k, l = f.shape[0], f.shape[1], m_hat.shape[-1]
    block = max(1, min(l, block_elements // max(g * k, 1)))
    out = torch.empty_like(m_hat)
    ft = f.transpose(-2, -1)
    for start in range(0, l, block):
        cols = slice(start, start + block)
        first = torch.bmm(f, m_hat[..., cols])  # (k, r) @ (r, c) -> (k, c)
        denom = torch.bmm(rows, stats[:, cols].mT.to(rows.dtype)).div_(bc2)  # (k, q) @ (q, c) -> (k, c)
        if floor is not None:
            torch.maximum(denom, first.square().mul_(floor), out=denom)
        denom.clamp_(min=0).sqrt_().mul_(s).add_(eps)
        u = first.mul_(s).div_(denom)
        out[..., cols] = torch.bmm(ft, u)  # (r, k) @ (k, c) -> (r, c)
        del first, denom, u  # before the next block's: one block of transients alive, not two
    return view.coefficients(out)


class ExactSecondMoment:
    """Per-column ``r x r`` blocks ``Q_j``, packed ``(l, P)``, re-based as ``Q_j <- T Q_j T^T``."""

    name = "exact"
    has_coefficient_form = True

    def __init__(self, block_elements: int | None) -> None:
        self.block_elements = block_elements

    def kinds(self) -> dict[str, StateKind]:
        return {"exp_avg_sq": StateKind.BLOCK}

    def init(self, view: FactorView) -> dict[str, Tensor]:
        r, l = view.coeff.shape[-2:]
        return {"exp_avg_sq": _zeros(view, l, r * (r + 1) // 2)}

    def observe(self, state: dict[str, Tensor], g: Tensor, view: FactorView, beta2: float, eps: float) -> None:
        g_count, r = g.shape[0], g.shape[-2]
        block = max(1, view.transient_elements(self.block_elements) // (g_count * r * (r + 1) // 2))
        ema_packed_outer_(state["exp_avg_sq"], g, triu_indices(r, g.device), beta2, block)

    def direction(
        self, state: dict[str, Tensor], view: FactorView, m_hat: Tensor, bc2: Tensor, eps: float, floor: Tensor | None
    ) -> Tensor:
        rows = quadratic_form_rows(view.basis, triu_indices(view.basis.shape[-1], view.basis.device))  # (G, k, P)
        return projected_direction(
            view, m_hat, rows, state["exp_avg_sq"], bc2, eps, floor, view.transient_elements(self.block_elements)
        )

    def coefficient_second_moment(self, state: dict[str, Tensor], view: FactorView) -> Tensor:
        """``diag(Q_j)`` as ``(G, r, l)``."""
        r = view.coeff.shape[-2]
        triu = triu_indices(r, view.gram.device)
        diagonal = (triu[0] == triu[1]).nonzero().squeeze(1)
        return state["exp_avg_sq"][..., diagonal].transpose(-2, -1).to(view.gram.dtype)


class DiagonalSecondMoment(ExactSecondMoment):
    """A diagonal ``v`` (r, l) in coefficient space, re-based as ``(T * T) v``; ``V_ij = s^2 sum_a f_ia^2 v_aj``."""

    name = "diagonal"

    def kinds(self) -> dict[str, StateKind]:
        return {"exp_avg_sq": StateKind.QUADRATIC}

    def init(self, view: FactorView) -> dict[str, Tensor]:
        return {"exp_avg_sq": _zeros(view, *_matrix_shape(view))}

    def observe(self, state: dict[str, Tensor], g: Tensor, view: FactorView, beta2: float, eps: float) -> None:
        view.canonical(state["exp_avg_sq"]).mul_(beta2).addcmul_(g, g, value=1 - beta2)

    def direction(
        self, state: dict[str, Tensor], view: FactorView, m_hat: Tensor, bc2: Tensor, eps: float, floor: Tensor | None
    ) -> Tensor:
        stats = view.canonical(state["exp_avg_sq"]).transpose(-2, -1)  # (G, l, r)
        f = view.basis
        return projected_direction(
            view, m_hat, f * f, stats, bc2, eps, None, view.transient_elements(self.block_elements)
        )

    def coefficient_second_moment(self, state: dict[str, Tensor], view: FactorView) -> Tensor:
        return view.canonical(state["exp_avg_sq"]).to(view.gram.dtype)


class FactoredSecondMoment:
    """Row and column mean squares of the full-space gradient ``X = s F g`` (``O(k + l)`` state):
    ``U = M^full * (R_i K_j / mean(R))^-1/2``, so ``Gamma^-1 F^T U / s = Gamma^-1 (F^T diag(a) F) M diag(b)``."""

    name = "factored"
    has_coefficient_form = False  # its statistics live in full space only

    def kinds(self) -> dict[str, StateKind]:
        return {"exp_avg_sq_row": StateKind.FULL_SPACE, "exp_avg_sq_col": StateKind.FULL_SPACE}

    def init(self, view: FactorView) -> dict[str, Tensor]:
        m, n = view.full_shape
        return {"exp_avg_sq_row": _zeros(view, m), "exp_avg_sq_col": _zeros(view, n)}

    @staticmethod
    def _canonical(state: dict[str, Tensor], view: FactorView) -> tuple[Tensor, Tensor]:
        """Row and column statistics in canonical orientation, ``(G, k)`` and ``(G, l)``."""
        rows, cols = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        return (cols, rows) if view.transposed else (rows, cols)

    def observe(self, state: dict[str, Tensor], g: Tensor, view: FactorView, beta2: float, eps: float) -> None:
        rows, cols = self._canonical(state, view)
        row_sq, col_sq = view.full_mean_squares(g.to(view.gram.dtype))
        rows.lerp_((row_sq + eps * eps).to(rows.dtype), 1 - beta2)
        cols.lerp_((col_sq + eps * eps).to(cols.dtype), 1 - beta2)

    def direction(
        self, state: dict[str, Tensor], view: FactorView, m_hat: Tensor, bc2: Tensor, eps: float, floor: Tensor | None
    ) -> Tensor:
        rows, cols = self._canonical(state, view)
        dtype = view.gram.dtype
        bc = bc2[..., 0]  # (G, 1)
        r_hat, k_hat = rows.to(dtype) / bc, cols.to(dtype) / bc
        a = (r_hat / r_hat.mean(-1, keepdim=True)).rsqrt()  # (G, k)
        b = k_hat.rsqrt()  # (G, l)
        weighted = torch.bmm(view.basis.mT, a[..., None] * view.basis)  # (r, k) @ (k, r) -> (r, r)
        return view.solve(torch.bmm(weighted, m_hat)) * b[:, None, :]


SecondMoment = ExactSecondMoment | FactoredSecondMoment


class LoFTAdamW(CalibrationRule):
    """LoFT-AdamW. ``second_moment`` picks ``exact``, ``factored`` or ``diagonal``;
    ``block_elements`` bounds the ``(G, k, c)`` transients of the exact and diagonal evaluation
    (default: :func:`~lowrank_opt.linalg.transient_elements`, a few times the group's factors,
    at most 2^19 on CPU, where blocks that stay in cache are fastest, and 2^22 on accelerators)."""

    name = "loft_adamw"
    reads_base_weight = False
    serves = (torch.optim.AdamW, torch.optim.Adam)

    def __init__(
        self, second_moment: Literal["exact", "factored", "diagonal"] = "exact", block_elements: int | None = None
    ) -> None:
        if block_elements is not None and (not isinstance(block_elements, int) or block_elements < 1):
            raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
        modes: dict[str, SecondMoment] = {
            "exact": ExactSecondMoment(block_elements),
            "factored": FactoredSecondMoment(),
            "diagonal": DiagonalSecondMoment(block_elements),
        }
        if second_moment not in modes:
            raise ValueError(f"second_moment must be one of {tuple(modes)}, got {second_moment!r}")
        self.mode = modes[second_moment]

    @property
    def second_moment(self) -> str:
        return self.mode.name

    def __repr__(self) -> str:
        return f"LoFTAdamW(second_moment={self.second_moment!r})"

    def has_coefficient_form(self) -> bool:
        return self.mode.has_coefficient_form

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
        return {"exp_avg": StateKind.LINEAR, **self.mode.kinds()}

    def init_state(self, view: FactorView, ctx: Context) -> dict[str, Tensor]:
        return {"exp_avg": _zeros(view, *_matrix_shape(view)), **self.mode.init(view)}

    def observe(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> None:
        beta1, beta2 = (float(b) for b in ctx.group["betas"])
        g = g_hat.to(state["exp_avg"].dtype)
        view.canonical(state["exp_avg"]).lerp_(g, 1 - beta1)
        self.mode.observe(state, g, view, beta2, ctx.hyper("eps"))

    def update(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> Tensor:
        beta1, beta2 = (float(b) for b in ctx.group["betas"])
        lr, eps = ctx.hyper("lr"), ctx.hyper("eps")
        step = ctx.per_member()  # (G, 1, 1)
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        m_hat = view.canonical(state["exp_avg"]).to(view.gram.dtype) / bc1  # (G, r, l)
        if not ctx.switches.project_update:
            second = self.mode.coefficient_second_moment(state, view)  # type: ignore[union-attr]
            return lr * m_hat / (second.div(bc2).sqrt() + eps)
        switches = ctx.switches
        # The floor is a theorem only when M and Q move with the same T.
        bound = self.second_moment == "exact" and switches.calibrate_first_moment == switches.calibrate_second_moment
        floor = second_moment_floor(beta1, beta2, step) if bound else None
        return lr * self.mode.direction(state, view, m_hat, bc2, eps, floor)
