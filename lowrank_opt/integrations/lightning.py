"""Lightning: ``Trainer(gradient_clip_val=...)`` on the wrapper's full-space norm.

Lightning clips in ``LightningModule.configure_gradient_clipping``, by default with
``torch.nn.utils.clip_grad_norm_`` on raw factor gradients. :class:`FullSpaceClipping` overrides
that hook: for a :class:`~lowrank_opt.LowRankWrapper` the threshold becomes the wrapper's
``max_grad_norm``, so the full-space norm is clipped inside ``step()``, once per optimizer step
(after gradient accumulation). Checkpoints carry the wrapper's ``state_dict()`` as usual.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

from ..wrapper import LowRankWrapper
from . import adopt_clip_threshold

__all__ = ["FullSpaceClipping"]


class FullSpaceClipping:
    """A ``LightningModule`` mixin; list it first: ``class Model(FullSpaceClipping, L.LightningModule)``.

    With a :class:`~lowrank_opt.LowRankWrapper` from ``configure_optimizers``,
    ``Trainer(gradient_clip_val=v)`` clips the total full-space gradient norm at ``v`` (the wrapper's
    ``max_grad_norm``; a wrapper built with another ``max_grad_norm`` is refused), and the norm
    before clipping is ``optimizer.last_grad_norm`` after each step. Clipping by value is refused:
    it would act on raw factor gradients. Other optimizers keep Lightning's clipping.
    """

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not isinstance(optimizer, LowRankWrapper):
            parent: Any = super()
            parent.configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not gradient_clip_val:
            return
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)  # Lightning's str enum, or a str
        if algorithm is not None and str(algorithm).lower() != "norm":
            raise ValueError(
                f"gradient_clip_algorithm={algorithm!r} clips raw factor gradients; use 'norm' with a LowRankWrapper"
            )
        adopt_clip_threshold(optimizer, gradient_clip_val, "gradient_clip_val")
