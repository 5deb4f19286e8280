"""transformers: ``LowRankTrainer``, a ``Trainer`` that trains LoRA through the wrapper.

``Trainer`` clips raw gradients at ``TrainingArguments.max_grad_norm`` (1.0 by default) before
``optimizer.step()`` and logs that raw norm as ``grad_norm``. For LoRA factors both are wrong:
the norm that means something is the full-space one. :class:`LowRankTrainer` builds the
optimizer the ``Trainer`` would build (``optim=``, ``optimizer_cls_and_kwargs=``, weight-decay
groups) and wraps it; the wrapper clips the full-space norm at ``max_grad_norm`` inside
``step()``, and the ``Trainer``'s own clipping call only measures that norm, which is what it
logs. Gradient accumulation, checkpoints and ``resume_from_checkpoint`` are the ``Trainer``'s.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers import Trainer

from ..wrapper import LowRankWrapper
from . import adopt_clip_threshold
from .accelerate import full_space_clipping, unwrap_optimizer

__all__ = ["LowRankTrainer"]


class LowRankTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is a :class:`~lowrank_opt.LowRankWrapper`.

    Takes every ``Trainer`` argument, plus ``lowrank_options``: keyword arguments of
    :class:`~lowrank_opt.LowRankWrapper` (``rule``, ``rule_options``, ``schedule``, ...). The base
    optimizer is the one the ``Trainer`` builds from ``args.optim`` or ``optimizer_cls_and_kwargs``;
    an optimizer passed through ``optimizers=`` is wrapped (or used as is when it already is a
    wrapper). ``args.max_grad_norm`` becomes the wrapper's ``max_grad_norm`` (``0`` disables
    clipping); ``grad_norm`` in the logs is the full-space norm before clipping.
    """

    def __init__(self, *args: Any, lowrank_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        options = dict(lowrank_options or {})
        if "max_grad_norm" in options:
            raise ValueError("set the clipping threshold with TrainingArguments.max_grad_norm, not lowrank_options")
        self.lowrank_options = options
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The ``Trainer``'s optimizer, wrapped; ``accelerator.clip_grad_norm_`` made full-space."""
        # transformers before 5 takes no model argument here
        optimizer = super().create_optimizer() if model is None else super().create_optimizer(model)
        if not isinstance(optimizer, LowRankWrapper):
            target = self.model if model is None else model
            if target is None:
                raise ValueError("LowRankTrainer needs a model to find its LoRA pairs")
            optimizer = LowRankWrapper(optimizer, target, **self.lowrank_options)
        wrapper = unwrap_optimizer(optimizer)
        max_norm = self.args.max_grad_norm
        if max_norm is not None and max_norm > 0:
            adopt_clip_threshold(wrapper, max_norm, "TrainingArguments.max_grad_norm")
        self.optimizer = optimizer
        full_space_clipping(self.accelerator, optimizer)
        return optimizer
