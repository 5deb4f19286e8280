"""The canonical one-sided view of a LoRA pair (MATH.md sections 1, 2 and 4).

When one factor moves and the other is frozen, both cases are one problem:

==============  =================  ===============  ===============  ==========
active factor   frozen basis ``F``  coefficients C   full space       k, l
==============  =================  ===============  ===============  ==========
``a``           ``b`` (m, r)       ``a`` (r, n)     ``W`` (m, n)     k=m, l=n
``b``           ``a^T`` (n, r)     ``b^T`` (r, m)   ``W^T`` (n, m)   k=n, l=m
==============  =================  ===============  ===============  ==========

and ``delta W_canon = s F @ C``. Statistics are stored in the factor's own orientation (same
shape as the parameter); :meth:`FactorView.canonical` turns them into ``(r, l)`` views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .linalg import cholesky_solve, compute_dtype, damped_cholesky
from .pairs import LoRAPair

__all__ = ["Side", "FactorView", "build_view", "coefficient_gram", "tangent_sq_norm"]

Side = Literal["a", "b"]


def coefficient_gram(coeff: Tensor) -> Tensor:
    """``C C^T`` (r, r) in the compute dtype: the Gram this factor gives its partner's basis."""
    c = coeff.to(compute_dtype(coeff.dtype))
    return c @ c.T


@dataclass(frozen=True, eq=False)
class FactorView:
    """One factor of a pair seen as coefficients ``C`` over the frozen basis ``F``.

    The Gram ``Gamma = F^T F`` and its damped Cholesky factor are computed once per step and
    reused by rescaling, clipping, projection and calibration.
    """

    pair: LoRAPair
    side: Side
    basis: Tensor  # F (k, r), compute dtype
    gram: Tensor  # Gamma (r, r)
    chol: Tensor  # Cholesky factor of Gamma + lambda I

    @property
    def param(self) -> Tensor:
        return self.pair.a if self.side == "a" else self.pair.b

    @property
    def partner(self) -> Tensor:
        return self.pair.b if self.side == "a" else self.pair.a

    @property
    def transposed(self) -> bool:
        """True when the canonical full space is ``W^T`` (the ``b`` side)."""
        return self.side == "b"

    @property
    def scale(self) -> float:
        return self.pair.scale

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(m, n)`` in the original orientation."""
        return self.pair.full_shape

    @property
    def coeff(self) -> Tensor:
        """``C`` (r, l), a view of the parameter."""
        return self.canonical(self.param)

    def canonical(self, t: Tensor) -> Tensor:
        """A tensor in the parameter's orientation seen as ``(r, l)`` (and back: it is an involution)."""
        return t if self.side == "a" else t.T

    def solve(self, rhs: Tensor) -> Tensor:
        """``Gamma^-1 rhs`` (damped)."""
        return cholesky_solve(self.chol, rhs)

    def rescale(self, grad: Tensor) -> Tensor:
        """Coefficient gradient ``g_hat = Gamma^-1 dL/dC / s^2`` (r, l); ``s F g_hat = P_F G``."""
        g = self.canonical(grad).to(self.gram.dtype)
        return self.solve(g) / self.scale**2

    def project(self, update: Tensor) -> Tensor:
        """``Gamma^-1 F^T U / s`` (r, c) for a full-space update block ``U`` (k, c)."""
        return self.solve(self.basis.T @ update) / self.scale  # (r, k) @ (k, c) -> (r, c)

    def full_mean_squares(self, g_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Row ``(k,)`` and column ``(l,)`` mean squares of ``X = s F g_hat`` without forming it:
        ``row_i = s^2 f_i^T (g g^T) f_i / l`` and ``col_j = s^2 g_j^T Gamma g_j / k``."""
        s2 = self.scale**2
        k, l = self.basis.shape[0], g_hat.shape[1]
        rows = s2 * ((self.basis @ (g_hat @ g_hat.T)) * self.basis).sum(1) / l  # (k, r) @ (r, r) -> (k, r)
        cols = s2 * ((self.gram @ g_hat) * g_hat).sum(0) / k  # (r, r) @ (r, l) -> (r, l)
        # Quadratic forms of PSD matrices: only rounding can make them negative.
        return rows.clamp_(min=0), cols.clamp_(min=0)

    def full_sq_norm(self, g_hat: Tensor) -> Tensor:
        """``||s F g_hat||_F^2 = s^2 sum((g g^T) * Gamma)`` without forming the (k, l) matrix."""
        return self.scale**2 * ((g_hat @ g_hat.T) * self.gram).sum()


def build_view(pair: LoRAPair, side: Side) -> FactorView:
    """The view of ``side`` with the other factor as frozen basis."""
    frozen = pair.b if side == "a" else pair.a.T
    basis = frozen.detach().to(compute_dtype(frozen.dtype))
    gram = coefficient_gram(basis.T)
    return FactorView(pair, side, basis, gram, damped_cholesky(gram))


def tangent_sq_norm(view_a: FactorView, g_a: Tensor, view_b: FactorView, g_b: Tensor) -> Tensor:
    """Squared norm of the projection of ``G`` on the tangent space of the rank-r manifold.

    ``||P_B G + G P_A - P_B G P_A||^2 = ||P_B G||^2 + ||G P_A||^2 - ||P_B G P_A||^2``: the
    full-space gradient that a step moving both factors sees. With ``Y = g_a A^T`` (r, r) and
    ``Z = Gamma_b^-1 Y^T``, ``||P_B G P_A||^2 = s^2 sum((Z^T Gamma_b Z) * Gamma_a)``.
    """
    y = g_a @ view_b.basis  # (r, n) @ (n, r) -> (r, r)
    z = view_b.solve(y.T)
    cross = view_a.scale**2 * ((z.T @ view_b.gram @ z) * view_a.gram).sum()
    return view_a.full_sq_norm(g_a) + view_b.full_sq_norm(g_b) - cross
