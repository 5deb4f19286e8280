"""Small dense linear algebra shared by every rule (docs/math.md sections 2, 3 and 6).

Shape symbols used throughout the package:

* ``m, n``: the full weight ``W0 + s * B @ A`` is ``(m, n)``; ``B`` is ``(m, r)``, ``A`` is ``(r, n)``.
* ``r``: the LoRA rank.
* ``k, l``: rows and columns of the canonical full space of one factor
  (``k = m, l = n`` when ``A`` moves, ``k = n, l = m`` when ``B`` moves).
* ``P = r (r + 1) / 2``: length of a packed symmetric ``r x r`` block.
* ``G``: the number of pairs stepped together as one group (a leading batch dimension).

Every function here takes any number of leading batch dimensions (``...``). Every ``r x r``
computation runs in :func:`compute_dtype` (float32, or float64 for float64 factors), and every
inverse of a Gram comes from the Cholesky factor of the damped Gram, never from ``inv``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

# A step's transient blocks hold at most TRANSIENT_MULTIPLE times the elements of the factors they
# serve, within the device's (floor, ceiling): on a CPU, blocks that stay in cache are fastest; on
# an accelerator, fewer and larger kernels are, and a block of 2^20 elements is still small.
TRANSIENT_MULTIPLE = 4
CPU_TRANSIENT_BOUNDS = (1 << 16, 1 << 19)
ACCELERATOR_TRANSIENT_BOUNDS = (1 << 20, 1 << 22)

__all__ = [
    "compute_dtype",
    "gram",
    "damped_cholesky",
    "damped_inverse",
    "RANK_TOLERANCE",
    "numerical_rank_mask",
    "gram_eig",
    "pseudo_inverse",
    "needs_pseudo_inverse",
    "transport",
    "triu_indices",
    "pack_outer",
    "ema_packed_outer_",
    "unpack_blocks",
    "pack_blocks",
    "congruence_packed_",
    "quadratic_form_rows",
    "transient_elements",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for small-matrix algebra: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(rows: Tensor) -> Tensor:
    """``X X^T`` (..., r, r) of ``X`` (..., r, l): the Gram of the basis whose transpose is ``X``."""
    return torch.bmm(rows, rows.mT) if rows.ndim == 3 else rows @ rows.mT


def damped_cholesky(gram: Tensor) -> Tensor:
    """Lower Cholesky factor of ``gram + lambda I`` with a damping relative to the dtype.

    ``lambda = 10 * eps(dtype) * trace(gram) / r + sqrt(tiny(dtype))``. The relative part keeps
    a full-rank float64 solve exact to ~1e-14; the absolute floor makes a zero Gram (peft
    initialises ``B = 0``) factor cleanly, so the solves below return zeros, never NaN.
    """
    r = gram.shape[-1]
    info = torch.finfo(gram.dtype)
    damping = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1).mul_(10.0 * info.eps / r).add_(info.tiny**0.5)
    damped = gram.clone()
    torch.diagonal(damped, dim1=-2, dim2=-1).add_(damping[..., None])
    # cholesky_ex: the damped Gram is positive definite by construction, and the plain call would
    # wait for the device to report success.
    return torch.linalg.cholesky_ex(damped).L


def damped_inverse(gram: Tensor) -> Tensor:
    """``(gram + lambda I)^-1`` (..., r, r) from its Cholesky factor (:func:`damped_cholesky`).

    A step applies ``Gamma^-1`` to right-hand sides of ``l`` columns. Inverting the ``r x r``
    damped Gram once from its Cholesky factor and multiplying costs ``O(r^3 + r^2 l)`` in two
    kernels, four times less than a batched ``cholesky_solve`` on CPU at ``r = 8``; for a symmetric
    positive definite matrix its error is of the same order, ``cond(Gamma + lambda I) eps``.
    """
    return torch.cholesky_inverse(damped_cholesky(gram))


# Eigenvalues of a Gram below RANK_TOLERANCE * r * mu_max are treated as zero, in every dtype:
# forming Gamma = F^T F in float32 makes errors of about eps(float32) mu_max, so smaller ones carry
# no information there, and float64 uses the same cut so that a float64 run keeps the directions a
# float32 run keeps and the two follow each other (docs/math.md section 11). The price: a basis
# with cond(F) beyond about 1 / sqrt(r eps(float32)) (~1000 at r = 8) loses its weakest directions,
# in float64 too, where the dense optimizer would still use them.
RANK_TOLERANCE = torch.finfo(torch.float32).eps


def numerical_rank_mask(evals: Tensor) -> Tensor:
    """The eigen-directions a Gram resolves: ``mu_i > r RANK_TOLERANCE mu_max`` (and above ``sqrt(tiny)``).

    ``evals`` (..., r) ascending, as :func:`torch.linalg.eigh` returns them."""
    tol = evals.shape[-1] * RANK_TOLERANCE * evals[..., -1:].clamp(min=0)
    return evals > tol.clamp(min=torch.finfo(evals.dtype).tiny ** 0.5)


def gram_eig(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Gamma = V diag(mu) V^T``: eigenvalues (..., r) clamped at zero, eigenvectors (..., r, r) and
    the mask of :func:`numerical_rank_mask`."""
    evals, evecs = torch.linalg.eigh(gram)
    return evals.clamp(min=0), evecs, numerical_rank_mask(evals)


def pseudo_inverse(gram: Tensor) -> Tensor:
    """The minimum-norm inverse ``V diag(1 / mu) V^T`` (..., r, r) over the resolved directions only.

    Applied to ``F^T X`` it gives the least-norm coefficients, with no component in the basis'
    numerical null space: nothing that changes nothing in ``W`` yet would blow up the next step's
    basis. On a full-rank, well-conditioned Gram it is the exact inverse (docs/math.md section 11).
    """
    evals, evecs, keep = gram_eig(gram)
    inv = keep / torch.where(keep, evals, torch.ones_like(evals))  # 1 / mu where resolved, else 0
    return (evecs * inv[..., None, :]) @ evecs.mT


def needs_pseudo_inverse(gram: Tensor, inverse: Tensor) -> Tensor:
    """Whether a Gram may have an unresolved direction (bool, one per matrix), from its inverse.

    ``trace(Gamma) trace(Gamma^-1)`` is at least ``cond(Gamma)`` (and at most ``r^2`` times it), so
    ``False`` proves every eigenvalue exceeds ``r RANK_TOLERANCE mu_max``: the damped inverse is then the
    inverse, and the pseudo-inverse is needed only where this says ``True``. A zero Gram gives
    ``False``: its damped inverse already maps everything to zero.
    """
    r = gram.shape[-1]
    bound = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) * torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
    return bound >= 1.0 / (r * RANK_TOLERANCE)


def transport(gram_new: Tensor, cross: Tensor) -> Tensor:
    """Calibration map ``T = Gamma_new^+ F_new^T F_old`` (..., r, r) from ``cross = F_new^T F_old``.

    The minimum-norm inverse: statistics re-based onto a rank-deficient basis get no component in
    its null space."""
    return pseudo_inverse(gram_new) @ cross


def triu_indices(r: int, device: torch.device | str | None = None) -> Tensor:
    """Row and column indices ``(2, P)`` of the upper triangle ``a <= b`` of an ``r x r`` block."""
    return torch.triu_indices(r, r, device=device)


def pack_outer(g: Tensor, triu: Tensor) -> Tensor:
    """Packed outer products of the columns of ``g`` (..., r, l): ``(..., l, P)``, entry ``[j, (a, b)] = g_aj g_bj``."""
    return rearrange(g[..., triu[0], :] * g[..., triu[1], :], "... p l -> ... l p")


def ema_packed_outer_(packed: Tensor, g: Tensor, triu: Tensor, beta: float, block_cols: int) -> None:
    """In place, ``Q_j <- beta Q_j + (1 - beta) g_j g_j^T`` on packed rows ``(..., l, P)``.

    Works on ``block_cols`` columns of ``g`` (..., r, l) at a time to bound the ``(..., P, c)`` transient.
    """
    for start in range(0, packed.shape[-2], block_cols):
        rows = packed[..., start : start + block_cols, :]
        rows.mul_(beta).add_(pack_outer(g[..., start : start + block_cols], triu).to(rows.dtype), alpha=1 - beta)


def unpack_blocks(packed: Tensor, triu: Tensor, r: int) -> Tensor:
    """Symmetric blocks ``(..., c, r, r)`` from packed rows ``(..., c, P)``."""
    blocks = packed.new_zeros(*packed.shape[:-1], r, r)
    blocks[..., triu[0], triu[1]] = packed
    blocks[..., triu[1], triu[0]] = packed
    return blocks


def pack_blocks(blocks: Tensor, triu: Tensor) -> Tensor:
    """Packed rows ``(..., c, P)`` of symmetric blocks ``(..., c, r, r)``."""
    return blocks[..., triu[0], triu[1]]


def congruence_packed_(packed: Tensor, t: Tensor, triu: Tensor, block_cols: int) -> None:
    """In place, ``Q_j <- T Q_j T^T`` for every packed block row of ``packed`` (G, l, P), ``t`` (G, r, r).

    Works on ``block_cols`` rows at a time so the unpacked transient stays ``(G, block_cols, r, r)``.
    """
    r = t.shape[-1]
    t = t.to(packed.dtype)[:, None]  # (G, 1, r, r): the same T for every column of a member
    for start in range(0, packed.shape[-2], block_cols):
        rows = packed[:, start : start + block_cols]
        blocks = unpack_blocks(rows, triu, r)  # (G, c, r, r)
        rows.copy_(pack_blocks(t @ blocks @ t.transpose(-2, -1), triu))
        del blocks  # before the next block's


def quadratic_form_rows(basis: Tensor, triu: Tensor) -> Tensor:
    """Rows ``(..., k, P)`` with entry ``w_ab f_ia f_ib`` (``w = 1`` on the diagonal, 2 off it).

    For packed blocks ``Q`` (..., c, P), ``quadratic_form_rows(F) @ Q^T`` is ``f_i^T Q_j f_i``
    (..., k, c): the exact second moment of docs/math.md section 6 as one GEMM.
    """
    weight = torch.where(triu[0] == triu[1], 1.0, 2.0).to(basis.dtype)
    return basis[..., triu[0]] * basis[..., triu[1]] * weight


def transient_elements(served: int, device: torch.device) -> int:
    """The most elements one transient block of a step may hold, for a group whose factors have
    ``served`` elements in all (``G r (k + l)``).

    Proportional to what is served (:data:`TRANSIENT_MULTIPLE` times), so a step's transients stay a
    small multiple of its factors and statistics however small the pairs are (what a memory-bounded
    distributed step counts on), within the device's bounds: below the floor a block loop would
    cost more in kernel launches than it saves, above the ceiling it would gain nothing.
    """
    floor, ceiling = CPU_TRANSIENT_BOUNDS if device.type == "cpu" else ACCELERATOR_TRANSIENT_BOUNDS
    return max(floor, min(ceiling, TRANSIENT_MULTIPLE * served))
