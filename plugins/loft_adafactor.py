r"""LoFT-Adafactor: ``torch.optim.Adafactor`` lifted to LoRA factors (docs/math.md section 7).

With ``X = s F g`` the full-space image of ``g = g_hat`` (r, l), ``f_i`` row ``i`` of ``F``:

.. math::
    \begin{aligned}
    &\textbf{every step, both factors } (1 - \hat\beta_{2,t} = t^{\tau}):\\
    &\quad R \leftarrow \mathrm{lerp}\big(R,\ s^2 f_i^\top (g g^\top) f_i / l,\ t^{\tau}\big) \ (k,)
      \qquad K \leftarrow \mathrm{lerp}\big(K,\ s^2 g_j^\top \Gamma g_j / k,\ t^{\tau}\big) \ (l,)\\
    &\textbf{active factor:}\quad D = \max(\mathrm{mean}(R_{orig}), \epsilon_1), \quad
      \hat V_{ij} = \max(R_i K_j / D,\ \epsilon_1^2), \quad U = X / \sqrt{\hat V}\\
    &\quad \alpha_t = \max(\epsilon_2, \mathrm{RMS}(W_0 + s B A))\, \min(\gamma, 1/\sqrt t)\\
    &\quad C \leftarrow C (1 - \gamma \lambda)
      - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U) / d)}\, \Gamma^{-1} F^\top U / s
    \end{aligned}

``R`` and ``K`` are kept in the ORIGINAL orientation as ``row_var`` (m,) and ``col_var`` (n,), and
``D`` always averages the original rows, as torch does; they live in full space and need no
calibration. When no clamp is active, which holds exactly when
``min(R) min(K) / D >= eps1^2``, ``U = sqrt(D) D_R^-1/2 X D_K^-1/2`` and everything is ``r x r``:

.. math::
    \Gamma^{-1} F^\top U / s = \sqrt{D}\, \Gamma^{-1} (F^\top D_R^{-1/2} F)\, g\, D_K^{-1/2},
    \qquad \mathrm{RMS}(U)^2 = D s^2 \textstyle\sum (F^\top D_R^{-1} F) \odot (g D_K^{-1} g^\top) / (k l)

for ``O((k + l) r^2)`` and no ``(m, n)`` tensor. Otherwise ``U`` is evaluated column block by
column block (``(k, c)`` transients, ``c k <= block_elements``), exactly as torch clamps it.
``RMS(W0 + s B A)`` needs no ``(m, n)`` tensor either:
``||W0||^2 + 2 s <F^T W0, C> + s^2 sum(Gamma * C C^T)`` (in canonical orientation).

At full rank (``W0 = 0``, ``m = n = r``, invertible factors, one factor per step) this is
Adafactor on ``W`` step for step.

Departures from ``torch.optim.Adafactor``:

* Decoupled decay multiplies the factor, which decays ``s B A`` rather than ``W`` (``W0`` is
  frozen).
* The base-weight terms of ``RMS(W)`` cost one ``(r, m) @ (m, n)`` product with ``W0`` per
  refresh, which dominates the step for large layers; the engine computes them block by block
  (a quantized ``W0`` is dequantized one block at a time; sharded ones are reduced from their
  shards). ``base_norm_every = N`` refreshes them at a pair's steps ``1, 1 + N, 1 + 2N, ...``
  from the factors before that step and keeps them in between (``N = 1``, the default, is
  torch's rule). A pair without a base weight uses ``RMS(s B A)``, with a warning.
* ``eps1 = 0`` is refused: a factor that starts at zero gives zero statistics, and torch would
  divide by them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lowrank_opt.linalg import gram
from lowrank_opt.rule import CalibrationRule, Context, StateKind
from lowrank_opt.views import FactorView

__all__ = ["LoFTAdafactor"]


class LoFTAdafactor(CalibrationRule):
    """LoFT-Adafactor. ``block_elements`` bounds the ``(G, k, c)`` transients of the clamped case
    (default: :func:`~lowrank_opt.linalg.transient_elements`);
    ``base_norm_every`` is how often (in steps) the base weight's share of ``RMS(W)`` is refreshed."""

    name = "loft_adafactor"
    serves = (torch.optim.Adafactor,)
    reads_base_weight = False  # only through record_base_products

    def __init__(self, block_elements: int | None = None, base_norm_every: int = 1) -> None:
        if block_elements is not None and (not isinstance(block_elements, int) or block_elements < 1):
            raise ValueError(f"block_elements must be a positive integer, got {block_elements!r}")
        if not isinstance(base_norm_every, int) or base_norm_every < 1:
            raise ValueError(f"base_norm_every must be a positive integer, got {base_norm_every!r}")
        self.block_elements = block_elements
        self.base_norm_every = base_norm_every
        self.base_products_every = base_norm_every
        self._warned_no_base = False  # the warning below, once per rule instance (one per wrapper)

    def __repr__(self) -> str:
        return f"LoFTAdafactor(base_norm_every={self.base_norm_every})"

    def check_group(self, group: Mapping[str, Any]) -> None:
        eps1 = group["eps"][0]
        if eps1 is not None and not eps1 > 0:
            raise ValueError(f"loft_adafactor needs eps1 > 0 or None (the dtype's eps), got eps=({eps1!r}, ...)")

    def state_kinds(self) -> Mapping[str, StateKind]:
        return dict.fromkeys(("row_var", "col_var", "base_sq_norm", "base_norm_step"), StateKind.FULL_SPACE)

    def init_state(self, view: FactorView, ctx: Context) -> dict[str, Tensor]:
        m, n = view.full_shape

        def zeros(*shape: int) -> Tensor:
            return torch.zeros((view.coeff.shape[0], *shape), dtype=view.coeff.dtype, device=view.coeff.device)

        # base_sq_norm: ||W0||^2 + 2 s <W0, B A>, refreshed at step base_norm_step (see record_base_products).
        return {"row_var": zeros(m), "col_var": zeros(n), "base_sq_norm": zeros(), "base_norm_step": zeros()}

    def record_base_products(
        self, state: dict[str, Tensor], products: Tensor, fresh: Tensor, view: FactorView, ctx: Context
    ) -> None:
        """``base_sq_norm <- ||W0||^2 + 2 s <W0, B A>`` where ``fresh``."""
        if not self._warned_no_base and any(pair.base_weight is None for pair in view.pairs):
            self._warned_no_base = True
            name = next(pair.name for pair in view.pairs if pair.base_weight is None) or "a pair"
            warnings.warn(f"loft_adafactor: {name} has no base weight; the relative step uses RMS(s B A)", stacklevel=5)
        products = products.to(state["base_sq_norm"].dtype)
        share = products[:, 0] + 2 * view.scale[:, 0, 0].to(products.dtype) * products[:, 1]
        state["base_sq_norm"].copy_(torch.where(fresh, share, state["base_sq_norm"]))
        state["base_norm_step"].copy_(torch.where(fresh, ctx.step.to(products.dtype), state["base_norm_step"]))

    def observe(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> None:
        g = -g_hat if ctx.group.get("maximize", False) else g_hat
        rows, cols = view.full_mean_squares(g)
        weight = ctx.step.pow(float(ctx.group["beta2_decay"]))[:, None]  # 1 - beta2_t, (G, 1)
        row_var, col_var = _canonical_stats(state, view)
        row_var.lerp_(rows.to(row_var.dtype), weight.to(row_var.dtype))
        col_var.lerp_(cols.to(col_var.dtype), weight.to(col_var.dtype))

    def update(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> Tensor:
        lr, d = ctx.hyper("lr"), float(ctx.group["d"])
        eps1, eps2 = ctx.group["eps"]
        eps1 = float(eps1) if eps1 is not None else torch.finfo(view.pairs[0].a.dtype).eps
        dtype = view.gram.dtype
        g = (-g_hat if ctx.group.get("maximize", False) else g_hat).to(dtype)
        rms = self._weight_rms(state, view, ctx)
        alpha = rms.clamp(min=float(eps2)) * ctx.step.rsqrt().clamp(max=lr)  # (G,)

        denom = state["row_var"].to(dtype).mean(-1).clamp(min=eps1)  # D: torch averages the original rows
        rows, cols = (v.to(dtype) for v in _canonical_stats(state, view))
        k, l = rows.shape[-1], cols.shape[-1]
        lowest = rows.amin(-1) * cols.amin(-1)
        separable = (lowest > 0) & (lowest / denom >= eps1 * eps1)  # (G,): no clamp is active
        direction, sq_norm = _separable_update(g, view, rows, cols, denom)
        if not bool(separable.all()):
            blocked, blocked_sq = self._blocked_update(g, view, rows, cols, denom, eps1)
            direction = torch.where(separable[:, None, None], direction, blocked)
            sq_norm = torch.where(separable, sq_norm, blocked_sq)
        clip = (sq_norm / (k * l)).sqrt().div(d).clamp(min=1.0)
        return direction * (alpha / clip)[:, None, None]

    def _weight_rms(self, state: dict[str, Tensor], view: FactorView, ctx: Context) -> Tensor:
        """``RMS(W0 + s B A)`` (G,) before this step, from ``r x r`` products and the base-weight terms."""
        s = view.scale[:, 0, 0]
        coeff = view.coeff
        sq = s * s * (view.gram * gram(coeff)).sum((-2, -1))  # ||s B A||^2 = s^2 sum((B^T B) * (A A^T))
        sq = sq + state["base_sq_norm"].to(sq.dtype)
        m, n = view.full_shape
        return (sq.clamp(min=0) / (m * n)).sqrt()

    def _blocked_update(
        self, g: Tensor, view: FactorView, rows: Tensor, cols: Tensor, denom: Tensor, eps1: float
    ) -> tuple[Tensor, Tensor]:
        """``Gamma^-1 F^T U / s`` and ``||U||^2`` (G,) with torch's clamp, over blocks of columns."""
        f, s = view.basis, view.scale
        members, k, l = f.shape[0], f.shape[1], g.shape[-1]
        budget = view.transient_elements(self.block_elements)
        block = max(1, min(l, budget // max(members * k, 1)))
        out = torch.empty_like(g)
        sq_norm = torch.zeros(members, dtype=g.dtype, device=g.device)
        ft = f.transpose(-2, -1)
        for start in range(0, l, block):
            part = slice(start, start + block)
            u = (rows[:, :, None] * cols[:, None, part]).div_(denom[:, None, None]).clamp_(min=eps1 * eps1).rsqrt_()
            u.mul_(f @ g[..., part]).mul_(s)  # U = X / sqrt(V_hat), X = s F g: (k, r) @ (r, c)
            sq_norm += u.square().sum((-2, -1))
            out[..., part] = ft @ u  # (r, k) @ (k, c) -> (r, c)
            del u  # before the next block's
        return view.coefficients(out), sq_norm


def _separable_update(g: Tensor, view: FactorView, rows: Tensor, cols: Tensor, denom: Tensor) -> tuple[Tensor, Tensor]:
    """The no-clamp case: ``U = sqrt(D) D_R^-1/2 X D_K^-1/2``, in ``r x r`` algebra only."""
    f, s = view.basis, view.scale
    ft = f.transpose(-2, -1)
    inv_rows, inv_cols = rows.reciprocal(), cols.reciprocal()
    weighted = view.solve(ft @ (inv_rows.sqrt()[..., None] * f))  # Gamma^-1 F^T D_R^-1/2 F: (r, k) @ (k, r)
    direction = (denom.sqrt()[:, None, None] * weighted) @ g * inv_cols.sqrt()[:, None, :]  # (r, r) @ (r, l)
    row_quad = ft @ (inv_rows[..., None] * f)  # F^T D_R^-1 F
    col_quad = (g * inv_cols[:, None, :]) @ g.transpose(-2, -1)  # g D_K^-1 g^T: (r, l) @ (l, r)
    sq_norm = denom * s[:, 0, 0].square() * (row_quad * col_quad).sum((-2, -1))
    return direction, sq_norm


def _canonical_stats(state: dict[str, Tensor], view: FactorView) -> tuple[Tensor, Tensor]:
    """``row_var`` and ``col_var`` as statistics of the canonical rows (G, k) and columns (G, l)."""
    rows, cols = state["row_var"], state["col_var"]
    return (cols, rows) if view.transposed else (rows, cols)
