"""accelerate: ``accelerator.clip_grad_norm_`` on the wrapper's full-space norm.

A :class:`~lowrank_opt.LowRankWrapper` goes through ``accelerator.prepare`` like any optimizer.
Two ways to clip:

* ``max_grad_norm=`` in the wrapper: clipping happens inside ``optimizer.step()``, which the
  prepared optimizer calls only on gradient-synchronising steps; nothing else is needed.
* ``accelerator.clip_grad_norm_(model.parameters(), max_norm)``, as accelerate documents it,
  after :func:`full_space_clipping`: without the call it would clip raw factor gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor

from ..wrapper import LowRankWrapper

__all__ = ["full_space_clipping", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> LowRankWrapper:
    """The :class:`~lowrank_opt.LowRankWrapper` inside ``optimizer`` (accelerate's, Lightning's or none)."""
    inner = optimizer
    while not isinstance(inner, LowRankWrapper) and isinstance(
        getattr(inner, "optimizer", None), torch.optim.Optimizer
    ):
        inner = inner.optimizer
    if not isinstance(inner, LowRankWrapper):
        raise ValueError(f"expected a LowRankWrapper (or an optimizer wrapping one), got {type(optimizer).__name__}")
    return inner


def clip_or_measure(wrapper: LowRankWrapper, max_norm: float) -> Tensor:
    """Clip the full-space norm to ``max_norm`` now, or, when the wrapper clips inside ``step()``
    (``max_grad_norm`` set), only measure it so that the gradients are clipped once, in ``step()``.

    Returns the total full-space norm before clipping.
    """
    if wrapper.max_grad_norm is None:
        return wrapper.clip_grad_norm_(max_norm)
    if max_norm != math.inf and max_norm != wrapper.max_grad_norm:
        raise ValueError(
            f"clipping at {max_norm!r} was asked, but the wrapper clips at max_grad_norm={wrapper.max_grad_norm!r} "
            "inside step(): use one threshold"
        )
    return wrapper.clip_grad_norm_(math.inf)


def full_space_clipping(accelerator: Accelerator, optimizer: Any) -> None:
    """Make ``accelerator.clip_grad_norm_`` clip full-space norms for the parameters of ``optimizer``.

    After this call, ``accelerator.clip_grad_norm_(params, max_norm)`` with ``params`` holding
    LoRA factors of the wrapper unscales mixed-precision gradients as accelerate does, then clips
    through :meth:`LowRankWrapper.clip_grad_norm_` and returns the full-space norm; ``max_norm=inf``
    only measures it. ``params`` must then be every parameter of the optimizer that has a
    gradient (``model.parameters()``), since the full-space norm spans them all. When the wrapper
    has ``max_grad_norm`` set, the call only measures and ``step()`` clips (the threshold must
    agree). Calls without LoRA factors keep accelerate's behaviour.

    Args:
        accelerator: the ``Accelerator`` (its other methods are untouched).
        optimizer: the wrapper, or what ``accelerator.prepare`` returned for it.
    """
    wrapper = unwrap_optimizer(optimizer)
    factors = {factor for pair in wrapper.pairs for factor in (pair.a, pair.b)}
    accelerate_clip = type(accelerator).clip_grad_norm_.__get__(accelerator)

    def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float = 2) -> Tensor:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
        given = {p for p in params if p.grad is not None}
        if given.isdisjoint(factors):
            return accelerate_clip(params, max_norm, norm_type)
        if norm_type != 2:
            raise ValueError(f"full-space clipping measures the 2-norm, got norm_type={norm_type!r}")
        owned = {p for group in wrapper.param_groups for p in group["params"] if p.grad is not None}
        if given != owned:
            raise ValueError(
                f"clip_grad_norm_ was given {len(given)} parameters with gradients, the optimizer has {len(owned)}: "
                "the full-space norm spans every parameter of the optimizer, pass them all (model.parameters())"
            )
        accelerator.unscale_gradients()
        return clip_or_measure(wrapper, max_norm)

    accelerator.clip_grad_norm_ = clip_grad_norm_  # type: ignore[method-assign]
