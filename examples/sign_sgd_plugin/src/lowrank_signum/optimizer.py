r"""Signum: sign-SGD with momentum, a dense ``torch.optim`` optimizer.

.. math::
    M \leftarrow \beta M + (1 - \beta) G, \qquad
    W \leftarrow W (1 - \gamma \lambda) - \gamma\, \mathrm{sign}(M)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class Signum(torch.optim.Optimizer):
    """Sign-SGD with momentum ``beta`` and decoupled weight decay."""

    def __init__(
        self, params: Iterable[Tensor], lr: float = 1e-3, beta: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "beta": beta, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["beta"])
                p.mul_(1 - group["lr"] * group["weight_decay"]).sub_(buf.sign(), alpha=group["lr"])
        return loss
