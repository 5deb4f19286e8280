"""Tasks that ``examples/compare.py`` trains optimizers on.

A task owns its data, its model and its metrics; the runner owns the
optimizers, the seeds and the bookkeeping. Every task builds two kinds of
model from a seed: the full model (every weight trainable, for full
fine-tuning) and the LoRA model (only LoRA factors and the task's own head
trainable). The same seed gives the same data order and the same initial
function for every optimizer, so runs differ only by their optimizer.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigError", "Task", "adapted_linear_weights", "MatrixFactorization", "PlayId", "CausalLM"]


class ConfigError(Exception):
    """A configuration the runner cannot use; reported as one line, not a traceback."""


class Task(ABC):
    """One benchmark problem: data, model, loss and metrics.

    ``evaluate`` returns a dict with ``loss`` and, for classification, ``acc``.
    Splits: ``"val"`` picks learning rates, ``"test"`` is reported.
    """

    #: Metrics reported by ``evaluate`` (``loss`` always first).
    metrics: tuple[str, ...] = ("loss",)

    @abstractmethod
    def setup(self, device: torch.device) -> None:
        """Load data onto ``device``; called once before any run (may be slow)."""

    @abstractmethod
    def build_model(self, seed: int, rank: int | None, alpha: float | None) -> nn.Module:
        """The full model when ``rank`` is None, else the LoRA model of that rank."""

    def lowrank_target(self, model: nn.Module) -> Any:
        """What ``LowRankWrapper`` receives: the model itself, or a list of ``LoRAPair``."""
        return model

    @abstractmethod
    def adapted_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The effective weight of every adapted layer, keyed by a name shared by the full and the
        LoRA model: the dense weight of the full model, ``W0 + s B A`` of the LoRA model (detached
        copies). Their change over a run is the run's ``delta W``."""

    @abstractmethod
    def batches(self, seed: int) -> Iterator[Any]:
        """An endless, seeded stream of training batches."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, seed: int) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (``"val"`` or ``"test"``) for the run of ``seed``."""


def adapted_linear_weights(model: nn.Module, targets: str) -> dict[str, torch.Tensor]:
    """Effective weights of the modules whose names fully match ``targets``: a peft LoRA layer
    gives ``W0 + sum over active adapters of scaling * B A``, a plain ``nn.Linear`` its weight."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not re.fullmatch(targets, name):
            continue
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer"):
            weight = module.get_base_layer().weight.detach().clone()
            for key in module.active_adapters:
                if key in module.lora_A:
                    b, a = module.lora_B[key].weight.detach(), module.lora_A[key].weight.detach()
                    weight += module.scaling[key] * (b @ a)  # (m, r) @ (r, n) -> (m, n)
            out[name] = weight
        elif isinstance(module, nn.Linear):
            out[name] = module.weight.detach().clone()
    if not out:
        raise ConfigError(f"no module of {type(model).__name__} matches the adapted-layer pattern {targets!r}")
    return out


# Imported last: the task modules subclass ``Task``.
from tasks.causal_lm import CausalLM  # noqa: E402
from tasks.matrix_factorization import MatrixFactorization  # noqa: E402
from tasks.play_id import PlayId  # noqa: E402
