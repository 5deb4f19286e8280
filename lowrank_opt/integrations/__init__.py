"""Integrations with training frameworks, each behind an optional extra and imported only when used.

* :mod:`lowrank_opt.integrations.transformers` (``pip install lowrank-opt[hf]``): ``LowRankTrainer``,
  a ``transformers.Trainer`` that trains through the wrapper and clips and logs full-space norms.
* :mod:`lowrank_opt.integrations.accelerate` (``[hf]``): ``full_space_clipping`` routes
  ``accelerator.clip_grad_norm_`` through the wrapper's full-space norm.
* :mod:`lowrank_opt.integrations.lightning` (``[lightning]``): ``FullSpaceClipping``, a
  ``LightningModule`` mixin that makes ``Trainer(gradient_clip_val=...)`` clip full-space norms.

Importing this package imports none of the frameworks.
"""
