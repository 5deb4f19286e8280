"""The canonical one-sided view of a group of LoRA pairs (docs/math.md sections 1, 2 and 4).

When one factor moves and the other is frozen, both cases are one problem:

==============  ==================  ===============  ===============  ==========
active factor   frozen basis ``F``  coefficients C   full space       k, l
==============  ==================  ===============  ===============  ==========
``a``           ``b`` (m, r)        ``a`` (r, n)     ``W`` (m, n)     k=m, l=n
``b``           ``a^T`` (n, r)      ``b^T`` (r, m)   ``W^T`` (n, m)   k=n, l=m
==============  ==================  ===============  ===============  ==========

and ``delta W_canon = s F @ C``. A view holds ``G`` pairs of equal shape at once: every tensor
carries a leading group dimension. Statistics are stored in the factor's own orientation (the
matrix shape of the parameter); :meth:`FactorView.canonical` turns them into ``(G, r, l)`` views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .linalg import compute_dtype, damped_inverse, gram, transient_elements
from .pairs import LoRAPair

__all__ = ["Side", "SIDES", "FactorView", "build_view", "canonical", "view_of", "other_side", "tangent_sq_norm"]

Side = Literal["a", "b"]
SIDES: tuple[Side, Side] = ("a", "b")


def other_side(side: Side) -> Side:
    return "b" if side == "a" else "a"


def canonical(side: Side, t: Tensor) -> Tensor:
    """A tensor in factor ``side``'s matrix orientation (``a`` (r, n), ``b`` (m, r)) seen in the
    canonical one, ``(..., r, l)`` for coefficients (and back: an involution)."""
    return t if side == "a" else t.transpose(-2, -1)


@dataclass(frozen=True, eq=False)
class FactorView:
    """One factor of ``G`` pairs seen as coefficients ``C`` over the frozen bases ``F``.

    The Grams ``Gamma = F^T F`` and their damped inverses are computed once per step and reused by
    rescaling, clipping and projection. Read-only: ``basis`` may be the frozen factor itself.
    """

    side: Side
    pairs: tuple[LoRAPair, ...]
    basis: Tensor  # F (G, k, r), compute dtype
    coeff: Tensor  # C (G, r, l), compute dtype, as the step found it
    gram: Tensor  # Gamma (G, r, r)
    inverse: Tensor  # (Gamma + lambda I)^-1 (G, r, r), from its Cholesky factor
    scale: Tensor  # s (G, 1, 1)
    full_shape: tuple[int, int]  # (m, n), the original orientation

    @property
    def transposed(self) -> bool:
        """True when the canonical full space is ``W^T`` (the ``b`` side)."""
        return self.side == "b"

    def transient_elements(self, given: int | None = None) -> int:
        """The most elements one transient block of this factor's step may hold: ``given`` (a
        rule's setting) when not None, else :func:`~lowrank_opt.linalg.transient_elements` of the
        basis and coefficients."""
        if given is not None:
            return given
        return transient_elements(self.basis.numel() + self.coeff.numel(), self.basis.device)

    def canonical(self, t: Tensor) -> Tensor:
        """A ``(G, ...)`` tensor in the factor's orientation seen as ``(G, r, l)`` (and back: an involution)."""
        return canonical(self.side, t)

    def solve(self, rhs: Tensor) -> Tensor:
        """``Gamma^-1 rhs`` (damped)."""
        return torch.bmm(self.inverse, rhs)

    def rescale(self, grad: Tensor) -> Tensor:
        """Coefficient gradients ``g_hat = Gamma^-1 dL/dC / s^2`` (G, r, l); ``s F g_hat = P_F G``."""
        # s^-2 folded into the (r, r) inverse: one pass over the (r, l) result instead of two.
        return torch.bmm(self.inverse / self.scale.square(), self.canonical(grad).to(self.gram.dtype))

    def project(self, update: Tensor) -> Tensor:
        """``Gamma^-1 F^T U / s`` (G, r, c) for full-space update blocks ``U`` (G, k, c)."""
        return self.coefficients(torch.bmm(self.basis.mT, update))  # (r, k) @ (k, c) -> (r, c)

    def coefficients(self, projected: Tensor) -> Tensor:
        """``Gamma^-1 P / s`` (G, r, c) for ``P = F^T U`` that a rule accumulated block by block:
        the coefficient change whose full-space image ``s F delta`` is ``P_F U``."""
        return torch.bmm(self.inverse / self.scale, projected)

    def full_mean_squares(self, g_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Row ``(G, k)`` and column ``(G, l)`` mean squares of ``X = s F g_hat`` without forming it:
        ``row_i = s^2 f_i^T (g g^T) f_i / l`` and ``col_j = s^2 g_j^T Gamma g_j / k``."""
        s2 = self.scale.square()
        k, l = self.basis.shape[-2], g_hat.shape[-1]
        rows = (torch.bmm(self.basis, gram(g_hat)) * self.basis).sum(-1) * (s2[..., 0] / l)  # (k, r) @ (r, r) -> (k, r)
        cols = (torch.bmm(self.gram, g_hat) * g_hat).sum(-2) * (s2[..., 0] / k)  # (r, r) @ (r, l) -> (r, l)
        # Quadratic forms of PSD matrices: only rounding can make them negative.
        return rows.clamp_(min=0), cols.clamp_(min=0)

    def full_sq_norm(self, g_hat: Tensor) -> Tensor:
        """``||s F g_hat||_F^2 = s^2 sum((g g^T) * Gamma)`` (G,) without forming the (k, l) matrix."""
        return (gram(g_hat) * self.gram).sum((-2, -1)) * self.scale.square()[:, 0, 0]

    def base_matrices(self) -> list[Tensor | None]:
        """``W0`` of every member in canonical orientation ``(k, l)`` (read live), ``None`` where absent."""
        bases = [pair.base_matrix() for pair in self.pairs]
        return [None if w is None else canonical(self.side, w) for w in bases]


def build_view(side: Side, pairs: Sequence[LoRAPair], a: Tensor, b: Tensor, scale: Tensor) -> FactorView:
    """The view of ``side`` of the stacked factors ``a`` (G, r, n) and ``b`` (G, m, r) (compute dtype),
    with the other factor as frozen basis."""
    basis, coeff = (b, a) if side == "a" else (a.mT, b.mT)  # F (G, k, r), C (G, r, l)
    gamma = gram(basis.mT)
    full_shape = (b.shape[-2], a.shape[-1])
    return FactorView(side, tuple(pairs), basis, coeff, gamma, damped_inverse(gamma), scale, full_shape)


def view_of(pair: LoRAPair, side: Side) -> FactorView:
    """The view of one pair (``G = 1``) from its factors as they are now: for tests and exploration."""
    a = pair.matrix_a(pair.a.detach())[None]
    b = pair.matrix_b(pair.b.detach())[None]
    cd = compute_dtype(a.dtype)
    scale = torch.full((1, 1, 1), pair.scale, dtype=cd, device=a.device)
    return build_view(side, [pair], a.to(cd), b.to(cd), scale)


def tangent_sq_norm(view_a: FactorView, g_a: Tensor, view_b: FactorView, g_b: Tensor) -> Tensor:
    """Squared norms (G,) of the projections of ``G`` on the tangent spaces of the rank-r manifold.

    ``||P_B G + G P_A - P_B G P_A||^2 = ||P_B G||^2 + ||G P_A||^2 - ||P_B G P_A||^2``: the
    full-space gradient that a step moving both factors sees. With ``Y = g_a A^T`` (r, r) and
    ``Z = Gamma_b^-1 Y^T``, ``||P_B G P_A||^2 = s^2 sum((Z^T Gamma_b Z) * Gamma_a)``.
    """
    y = torch.bmm(g_a, view_b.basis)  # (r, n) @ (n, r) -> (r, r)
    z = view_b.solve(y.transpose(-2, -1))
    zt = z.transpose(-2, -1)
    cross = (torch.bmm(torch.bmm(zt, view_b.gram), z) * view_a.gram).sum((-2, -1)) * view_a.scale.square()[:, 0, 0]
    return view_a.full_sq_norm(g_a) + view_b.full_sq_norm(g_b) - cross
