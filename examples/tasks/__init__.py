"""Tasks that ``examples/compare.py`` trains optimizers on.

A task owns its data, its model and its metrics; the runner owns the
optimizers, the seeds and the bookkeeping. Every task builds two kinds of
model from a seed: the full model (every weight trainable, for full
fine-tuning) and the LoRA model (only LoRA factors and the task's own head
trainable). The same seed gives the same data order and the same initial
function for every optimizer, so runs differ only by their optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ConfigError", "Task", "MatrixFactorization", "PlayId"]


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
    def batches(self, seed: int) -> Iterator[Any]:
        """An endless, seeded stream of training batches."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, seed: int) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (``"val"`` or ``"test"``) for the run of ``seed``."""


# Imported last: the task modules subclass ``Task``.
from tasks.matrix_factorization import MatrixFactorization  # noqa: E402
from tasks.play_id import PlayId  # noqa: E402
