"""A plain, slow LoFT-AdamW written straight from docs/math.md section 6, for checking the fast path.

It forms every full-space matrix, keeps each ``Q_j`` as a dense ``r x r`` block, and solves
with ``torch.linalg.solve``; nothing here is shared with the library.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReferenceLoFTAdamW:
    def __init__(
        self,
        b: Tensor,
        a: Tensor,
        scale: float,
        lr: float,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        second_moment="exact",
    ):
        self.b, self.a, self.s = b.clone(), a.clone(), scale
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.mode = second_moment
        r = a.shape[0]
        self.state = {}
        for side, l in (("a", a.shape[1]), ("b", b.shape[0])):
            k = b.shape[0] if side == "a" else a.shape[1]
            self.state[side] = {
                "M": torch.zeros(r, l, dtype=a.dtype),
                "Q": torch.zeros(l, r, r, dtype=a.dtype),
                "v": torch.zeros(r, l, dtype=a.dtype),
                "row": torch.zeros(k, dtype=a.dtype),
                "col": torch.zeros(l, dtype=a.dtype),
            }
        self.t = 0

    def weight(self) -> Tensor:
        return self.s * self.b @ self.a

    def _canon(self, side: str, grad_w: Tensor):
        """(F, C, G_canon) for one side."""
        if side == "a":
            return self.b, self.a, grad_w
        return self.a.T, self.b.T, grad_w.T

    def step(self, grad_w: Tensor, active: tuple[str, ...]) -> None:
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        gs = {}
        for side in ("a", "b"):
            f, _, g_full = self._canon(side, grad_w)
            gamma = f.T @ f
            g = torch.linalg.solve(gamma, f.T @ g_full) / self.s  # Gamma^-1 (dL/dC) / s^2
            gs[side] = g
            st = self.state[side]
            st["M"] = b1 * st["M"] + (1 - b1) * g
            st["Q"] = b2 * st["Q"] + (1 - b2) * torch.einsum("aj,bj->jab", g, g)
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            x = self.s * f @ g
            st["row"] = b2 * st["row"] + (1 - b2) * ((x**2).mean(1) + self.eps**2)
            st["col"] = b2 * st["col"] + (1 - b2) * ((x**2).mean(0) + self.eps**2)
        new = {}
        for side in active:
            f, c, _ = self._canon(side, grad_w)
            st = self.state[side]
            m_full = self.s * f @ st["M"] / bc1
            if self.mode == "exact":
                v = self.s**2 * torch.einsum("ia,jab,ib->ij", f, st["Q"], f) / bc2
                u = m_full / (v.sqrt() + self.eps)
            elif self.mode == "diagonal":
                v = self.s**2 * (f * f) @ st["v"] / bc2
                u = m_full / (v.sqrt() + self.eps)
            else:
                row, col = st["row"] / bc2, st["col"] / bc2
                v = row[:, None] * col[None, :] / row.mean()
                u = m_full / v.sqrt()
            delta = torch.linalg.solve(f.T @ f, f.T @ u) / self.s
            new[side] = c * (1 - self.lr * self.wd) - self.lr * delta
        for side, c_new in new.items():
            old_a, old_b = self.a.clone(), self.b.clone()
            if side == "a":
                self.a = c_new
            else:
                self.b = c_new.T
            # The partner's basis moved: F_new^T F_old with F = C^T of the mover.
            c_old = old_a if side == "a" else old_b.T
            t = torch.linalg.solve(c_new @ c_new.T, c_new @ c_old.T)
            other = self.state["b" if side == "a" else "a"]
            other["M"] = t @ other["M"]
            other["Q"] = t @ other["Q"] @ t.T
            other["v"] = (t * t) @ other["v"]
