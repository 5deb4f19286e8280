"""Integrations with training frameworks, each behind an optional extra and imported only when used.

* :mod:`lowrank_opt.integrations.transformers` (``pip install lowrank-opt[hf]``): ``LowRankTrainer``,
  a ``transformers.Trainer`` that trains through the wrapper and clips and logs full-space norms.
* :mod:`lowrank_opt.integrations.accelerate` (``[hf]``): ``full_space_clipping`` routes
  ``accelerator.clip_grad_norm_`` through the wrapper's full-space norm.
* :mod:`lowrank_opt.integrations.lightning` (``[lightning]``): ``FullSpaceClipping``, a
  ``LightningModule`` mixin that makes ``Trainer(gradient_clip_val=...)`` clip full-space norms.

Importing this package imports none of the frameworks; :func:`adopt_clip_threshold`, shared by
the Trainer integrations, lives here.
"""

from ..wrapper import LowRankWrapper

__all__ = ["adopt_clip_threshold"]


def adopt_clip_threshold(wrapper: LowRankWrapper, threshold: float, source: str) -> None:
    """Make a framework's clipping ``threshold`` (its setting named ``source``) the wrapper's
    ``max_grad_norm``, so that the full-space norm is clipped inside ``step()``; a wrapper built
    with another ``max_grad_norm`` is refused, naming both."""
    if wrapper.max_grad_norm is None:
        wrapper.max_grad_norm = float(threshold)
    elif wrapper.max_grad_norm != threshold:
        raise ValueError(
            f"the wrapper clips at max_grad_norm={wrapper.max_grad_norm!r} but {source} is {threshold!r}: "
            "use one threshold"
        )
