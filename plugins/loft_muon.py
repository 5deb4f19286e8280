r"""LoFT-Muon: ``torch.optim.Muon`` lifted to LoRA factors (docs/math.md section 8).

.. math::
    \begin{aligned}
    &\textbf{every step, both factors } (g = \hat g,\ (r, l)):\\
    &\quad M \leftarrow \mu M + (1 - \mu) g\\
    &\textbf{active factor } (\Gamma = F^\top F = V \Lambda V^\top,\ R = \Lambda^{1/2} V^\top):\\
    &\quad Z = g + \mu (M - g) \ \text{(nesterov)}, \qquad Z = M \ \text{(otherwise)}\\
    &\quad \Delta = V \Lambda^{-1/2}\, \mathrm{NS}(s R Z) / s
        \qquad \big(s F \Delta = \mathrm{NS}(s F Z)\big)\\
    &\quad C \leftarrow C (1 - \gamma \lambda) - \gamma\, \rho(m, n)\, \Delta
    \end{aligned}

``NS`` is Newton-Schulz with torch's coefficients, steps and ``eps`` (input scaled to unit
Frobenius norm, transposed when it has more rows than columns); ``rho(m, n)`` is torch's
learning-rate adjustment evaluated on the FULL shape ``(m, n)``: ``sqrt(max(1, m / n))``
(``original``, the default) or ``0.2 sqrt(max(m, n))`` (``match_rms_adamw``).

Why this is exact: with ``F = U R`` and orthonormal ``U = F V Lambda^-1/2``, Newton-Schulz is
equivariant, ``NS(s F Z) = U NS(s R Z)``, and the update lies in the span of ``F``, so bringing
it back (``Gamma^+ F^T U / s``) loses nothing. At full rank (``W0 = 0``, ``m = n = r``,
invertible factors, one factor per step) this is Muon on ``W`` step for step. Cost per active
factor: ``O(r^3 + ns_steps r^2 l)`` on top of the Gram the view already holds; nothing of size
``(m, n)`` and nothing of size ``(k, r)`` is formed.

Departures from ``torch.optim.Muon``:

* ``R`` comes from the eigendecomposition of the (already formed) Gram instead of a thin QR of
  ``F``. Both give ``F = U R`` with orthonormal ``U``, and Newton-Schulz does not see the
  difference; the eigendecomposition also reveals rank: directions of ``F`` with eigenvalue at
  or below ``r eps(dtype) max(Lambda)`` are dropped, so a zero factor (peft's ``B = 0``) gives a
  zero update and a rank-deficient one gives the exact update within its span, never NaN.
* ``ns_dtype`` chooses the dtype of the iteration: ``bfloat16`` like torch (default), or
  ``float32`` / ``float64``. The iteration runs on ``(r, l)``, not ``(m, n)``, so in bfloat16
  rounding differs from torch's (tests bound the gap); in float64 it is torch's update rule.
* Decoupled decay multiplies the factor, which decays ``s B A`` rather than ``W`` (``W0`` is
  frozen). The learning rate in the decay is the unadjusted one, as in torch.

``torch.optim.Muon`` accepts only 2-D parameters: LoRA factors and 2-D non-LoRA weights can share
the base optimizer, but biases, norms and embeddings need a second optimizer of their own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lowrank_opt.linalg import gram_eig
from lowrank_opt.rule import CalibrationRule, Context, StateKind
from lowrank_opt.views import FactorView

__all__ = ["LoFTMuon", "newton_schulz", "lr_ratio"]

_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_ADJUST_LR = (None, "original", "match_rms_adamw")


def newton_schulz(x: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    r"""The quintic Newton-Schulz iteration of ``torch.optim.Muon``, in ``x.dtype``, on a stack ``(G, p, q)``.

    .. math::
        X_0 = x / \max(\|x\|_F, \epsilon), \qquad
        X_{i+1} = a X_i + (b A_i + c A_i^2) X_i, \quad A_i = X_i X_i^\top

    on ``x^T`` when ``x`` has more rows than columns, so ``A_i`` is the smaller Gram.
    """
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]
    y = x.transpose(-2, -1) if tall else x
    y = y / y.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.transpose(-2, -1)
        y = torch.baddbmm(y, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), y, beta=a)
    return y.transpose(-2, -1) if tall else y


def lr_ratio(adjust_lr_fn: str | None, full_shape: tuple[int, int]) -> float:
    """torch's Muon learning-rate factor for a weight of shape ``(m, n)`` (the FULL weight)."""
    m, n = full_shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    return math.sqrt(max(1.0, m / n))


def orthogonalized_coefficients(
    z: Tensor,
    view: FactorView,
    *,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    ns_dtype: torch.dtype,
) -> Tensor:
    """``Delta`` (G, r, l) with ``s F Delta = NS(s F z)``, from the Grams of ``F`` alone."""
    evals, evecs, keep = gram_eig(view.gram)  # (G, r), (G, r, r), (G, r)
    root = evals.sqrt()
    # Dropped directions get a zero row in R and a zero column in its pseudo-inverse.
    r_factor = (root * keep)[..., None] * evecs.transpose(-2, -1)  # (r, r): R = Lambda^1/2 V^T
    r_pinv = evecs * (keep / torch.where(keep, root, torch.ones_like(root)))[:, None, :]  # (r, r): V Lambda^-1/2
    s = view.scale
    ortho = newton_schulz((s * (r_factor @ z)).to(ns_dtype), coefficients, steps, eps)  # (r, l)
    return r_pinv @ ortho.to(z.dtype) / s  # (r, r) @ (r, l) -> (r, l)


class LoFTMuon(CalibrationRule):
    """LoFT-Muon. ``ns_dtype`` (``"bfloat16"``, ``"float32"`` or ``"float64"``) is the dtype of the
    Newton-Schulz iteration; torch runs it in bfloat16."""

    name = "loft_muon"
    reads_base_weight = False
    serves = (torch.optim.Muon,)

    def __init__(self, ns_dtype: str = "bfloat16") -> None:
        if ns_dtype not in _NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {tuple(_NS_DTYPES)}, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype

    def __repr__(self) -> str:
        return f"LoFTMuon(ns_dtype={self.ns_dtype!r})"

    def check_group(self, group: Mapping[str, Any]) -> None:
        missing = [key for key in ("momentum", "nesterov", "ns_coefficients", "ns_steps", "eps") if key not in group]
        if missing or not group.get("use_muon", True):
            raise ValueError(
                f"loft_muon: a param group holding LoRA factors is not a Muon group (missing {missing or 'use_muon'}); "
                "put the factors in torch.optim.Muon's groups (MuonWithAdamW: use_muon=True)"
            )
        if group.get("adjust_lr_fn") not in _ADJUST_LR:
            raise ValueError(f"loft_muon: adjust_lr_fn must be one of {_ADJUST_LR}, got {group.get('adjust_lr_fn')!r}")
        steps = group["ns_steps"]
        if not isinstance(steps, int) or not 0 <= steps < 100:
            raise ValueError(f"loft_muon: ns_steps must be an integer in [0, 100), got {steps!r}")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"loft_muon: ns_coefficients must be three numbers, got {group['ns_coefficients']!r}")

    def state_kinds(self) -> Mapping[str, StateKind]:
        return {"momentum_buffer": StateKind.LINEAR}

    def init_state(self, view: FactorView, ctx: Context) -> dict[str, Tensor]:
        r, l = view.coeff.shape[-2:]
        shape = (r, l) if view.side == "a" else (l, r)
        return {
            "momentum_buffer": torch.zeros(
                (view.coeff.shape[0], *shape), dtype=view.coeff.dtype, device=view.coeff.device
            )
        }

    def observe(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> None:
        buf = view.canonical(state["momentum_buffer"])
        buf.lerp_(g_hat.to(buf.dtype), 1 - float(ctx.group["momentum"]))

    def update(self, state: dict[str, Tensor], g_hat: Tensor, view: FactorView, ctx: Context) -> Tensor:
        mu = float(ctx.group["momentum"])
        buf = view.canonical(state["momentum_buffer"])
        z = (g_hat.to(buf.dtype).lerp(buf, mu) if ctx.group["nesterov"] else buf).to(view.gram.dtype)  # Nesterov input
        direction = orthogonalized_coefficients(
            z,
            view,
            coefficients=tuple(float(c) for c in ctx.group["ns_coefficients"]),  # type: ignore[arg-type]
            steps=ctx.group["ns_steps"],
            eps=float(ctx.group["eps"]),
            ns_dtype=_NS_DTYPES[self.ns_dtype],
        )
        return ctx.hyper("lr") * lr_ratio(ctx.group.get("adjust_lr_fn"), view.full_shape) * direction
