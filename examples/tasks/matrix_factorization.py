"""The synthetic matrix factorisation problem of the LoFT paper.

Fit ``W* = U V`` (U: (d_in, target_rank), V: (target_rank, d_out), standard
normal entries) with a model that maps ``d_in`` inputs to ``d_out`` outputs as
``x @ W``, from identity inputs, with the mean squared error. The factorised
model's weight (torch layout, ``W^T``: (d_out, d_in)) is ``B A`` with
B: (d_out, r) and A: (r, d_in), both initialised as ``nn.Linear`` weights and
both trained; full training moves a dense weight started at the same ``B0 A0``.
With identity inputs the model's output is its weight, so the task reads the
weight directly instead of multiplying it by an identity matrix.

``bias=True`` is the setup of the LoFT authors' public code: ``B`` is an
``nn.Linear`` with a trainable bias, so every output column gains a bias ``c``
(the model's output is ``W^T + c``); full training gets the same bias, started
at the same value. The bias is not part of a LoRA pair: under LoFT the base
optimizer steps it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tasks import ConfigError, Task


class _Factorised(nn.Module):
    """A linear map whose weight is ``B A``: B (d_out, r), A (r, d_in); no frozen base; an
    optional output bias (d_out,)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.a = nn.Parameter(a)  # (r, d_in)
        self.b = nn.Parameter(b)  # (d_out, r)
        self.bias = None if bias is None else nn.Parameter(bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.b @ self.a  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T  # (batch, d_in) @ (d_in, d_out) -> (batch, d_out)
        return out if self.bias is None else out + self.bias


class MatrixFactorization(Task):
    """Fit ``W* = U V`` from identity inputs with MSE.

    Args:
        d_in: Inputs (rows of W*).
        d_out: Outputs (columns of W*).
        target_rank: Rank of the target.
        dtype: ``float32`` or ``float64``.
        bias: Train an output bias as well (the LoFT authors' setup: a bias on ``B``).
    """

    def __init__(
        self, d_in: int = 1024, d_out: int = 512, target_rank: int = 8, dtype: str = "float32", bias: bool = False
    ) -> None:
        if min(d_in, d_out, target_rank) < 1:
            raise ConfigError(
                f"matrix_factorization: d_in, d_out and target_rank must be positive, got {d_in}, {d_out}, {target_rank}"
            )
        if dtype not in ("float32", "float64"):
            raise ConfigError(f"matrix_factorization: dtype must be float32 or float64, got {dtype!r}")
        self.d_in, self.d_out, self.target_rank = d_in, d_out, target_rank
        self.dtype = getattr(torch, dtype)
        self.bias = bias
        self.device = torch.device("cpu")
        self._targets: dict[int, torch.Tensor] = {}

    def setup(self, device: torch.device) -> None:
        self.device = device

    def target(self, seed: int) -> torch.Tensor:
        """``(U V)^T`` (d_out, d_in) in the model's weight layout."""
        if seed not in self._targets:
            # Its own generator: the target does not depend on the model's rank.
            g = torch.Generator().manual_seed(seed)
            u = torch.randn(self.d_in, self.target_rank, generator=g, dtype=torch.float64)
            v = torch.randn(self.target_rank, self.d_out, generator=g, dtype=torch.float64)
            self._targets[seed] = (u @ v).T.to(self.device, self.dtype)  # (d_in, k) @ (k, d_out) -> (d_in, d_out)
        return self._targets[seed]

    def build_model(self, seed: int, rank: int | None, alpha: float | None) -> nn.Module:
        r = self.target_rank if rank is None else rank
        if r > min(self.d_in, self.d_out):
            raise ConfigError(
                f"matrix_factorization: rank {r} is larger than the {self.d_out}x{self.d_in} matrix allows"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            a = nn.Linear(self.d_in, r, bias=False, dtype=torch.float64).weight.detach()  # (r, d_in)
            lora_b = nn.Linear(r, self.d_out, bias=self.bias, dtype=torch.float64)
            b = lora_b.weight.detach()  # (d_out, r)
            bias = None if lora_b.bias is None else lora_b.bias.detach()  # (d_out,)
        if rank is None:
            # Full training starts from the same function as the factorised runs.
            dense = nn.Linear(self.d_in, self.d_out, bias=self.bias, dtype=torch.float64)
            with torch.no_grad():
                dense.weight.copy_(b @ a)
                if bias is not None:
                    dense.bias.copy_(bias)
            return dense.to(self.device, self.dtype)
        return _Factorised(a, b, bias).to(self.device, self.dtype)

    def lowrank_target(self, model: nn.Module) -> Any:
        import lowrank_opt as lo

        return [lo.LoRAPair(model.a, model.b, 1.0, name="W")]

    def adapted_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"W": model.weight.detach().clone()}

    def batches(self, seed: int) -> Iterator[torch.Tensor]:
        target = self.target(seed)
        while True:
            yield target

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        # model(I) == W^T (+ bias) exactly; reading the weight skips a (d_in, d_in) GEMM.
        output = model.weight if model.bias is None else model.weight + model.bias[:, None]  # (d_out, d_in)
        return F.mse_loss(output, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, seed: int) -> dict[str, float]:
        # One objective and no held-out data: every split is the loss after the last step.
        return {"loss": self.loss(model, self.target(seed)).item()}
