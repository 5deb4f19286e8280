"""Warnings for settings that were measured to train badly or slowly under a rule.

Each warning is a :class:`LowRankAdviceWarning`, given at most once per wrapper, and names the
measurement behind it and the setting to use instead. Silence them all with::

    import warnings
    import lowrank_opt

    warnings.filterwarnings("ignore", category=lowrank_opt.LowRankAdviceWarning)

The measurements:

* ``torch.optim.Adafactor`` at its default learning rate (``1e-2``) under ``loft_adafactor``: on
  a 135M-parameter causal language model with LoRA on every linear layer, validation loss rose
  from 4.17 to 4.45 in 20 steps; ``3e-3`` trained normally.
* ``loft_adamw`` with ``second_moment="exact"`` on the CPU: for 210 pairs at rank 8 on the same
  model, the optimizer step took 0.86 s against 0.18 s with ``"factored"`` (a training step 44%
  longer), and both modes ended at the same loss (3.662 after 60 steps). The excess is about
  3 ms per pair per step at that rank, so the warning starts above :data:`EXACT_CPU_MAX_PAIRS`
  pairs, where the excess passes 0.2 s per step, longer than the whole factored step of those 210
  pairs. Below
  it (the 36 pairs of the play_id benchmark: 53 ms per exact step) the reference mode costs
  little and is kept without comment.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from .pairs import LoRAPair
from .registry import available_rules

__all__ = ["EXACT_CPU_MAX_PAIRS", "LowRankAdviceWarning", "advise"]

# More pairs than this on the CPU with loft_adamw's exact second moment: suggest factored.
EXACT_CPU_MAX_PAIRS = 64
# The smallest default learning rate measured to diverge under loft_adafactor, and one that trained.
_ADAFACTOR_DIVERGED_LR = 1e-2
_ADAFACTOR_FINE_LR = 3e-3


class LowRankAdviceWarning(UserWarning):
    """A setting that measurements show trains badly or slowly under the chosen rule."""


def advise(
    base_optimizer: Optimizer,
    rule_name: str,
    rule_options: Mapping[str, Any],
    pairs: Sequence[LoRAPair],
    seen: set[str],
    *,
    enabled: bool = True,
) -> None:
    """Warn about the measured-bad settings among those a wrapper is built with.

    Args:
        base_optimizer: the wrapped optimizer; only the param groups holding LoRA factors are read.
        rule_name: the name of the rule that steps the factors.
        rule_options: the options the rule was built with (its defaults fill the rest).
        pairs: the wrapper's LoRA pairs.
        seen: keys of the warnings this wrapper already gave; each is given once, then added here.
        enabled: ``False`` gives no warning.

    The warning is attributed to the code that built the wrapper (two frames above this call).
    """
    if not enabled or not pairs:
        return
    if rule_name == "loft_adafactor" and "adafactor_default_lr" not in seen:
        lr = _default_lr_in_use(base_optimizer, pairs)
        if lr is not None and lr >= _ADAFACTOR_DIVERGED_LR:
            seen.add("adafactor_default_lr")
            _warn(
                f"{type(base_optimizer).__name__} is at its default lr={lr:g}, which diverged under loft_adafactor "
                f"(135M causal LM, LoRA on every linear layer: validation loss 4.17 -> 4.45 in 20 steps); "
                f"start at lr={_ADAFACTOR_FINE_LR:g}"
            )
    if rule_name == "loft_adamw" and "exact_on_cpu" not in seen:
        mode = rule_options.get("second_moment", _rule_default(rule_name, "second_moment"))
        on_cpu = all(factor.device.type == "cpu" for pair in pairs for factor in (pair.a, pair.b))
        if mode == "exact" and on_cpu and len(pairs) > EXACT_CPU_MAX_PAIRS:
            seen.add("exact_on_cpu")
            _warn(
                f"loft_adamw's exact second moment on the CPU with {len(pairs)} pairs (more than "
                f"{EXACT_CPU_MAX_PAIRS}) is slow: for 210 pairs at rank 8 its step took 0.86 s against 0.18 s for "
                'rule_options={"second_moment": "factored"}, which reached the same loss (3.662 after 60 steps); '
                "consider factored"
            )


def _warn(message: str) -> None:
    # _warn <- advise <- the wrapper's constructor <- the user's code.
    warnings.warn(
        message + " (silence: warnings.filterwarnings('ignore', category=lowrank_opt.LowRankAdviceWarning))",
        LowRankAdviceWarning,
        stacklevel=4,
    )


def _default_lr_in_use(optimizer: Optimizer, pairs: Sequence[LoRAPair]) -> float | None:
    """The optimizer class's default ``lr`` if a group holding LoRA factors still uses it, else ``None``."""
    parameter = inspect.signature(type(optimizer).__init__).parameters.get("lr")
    if parameter is None or not isinstance(parameter.default, (int, float)):
        return None
    default = float(parameter.default)
    factors = {factor for pair in pairs for factor in (pair.a, pair.b)}
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if lr == default and any(p in factors for p in group["params"]):
            return default
    return None


def _rule_default(rule_name: str, option: str) -> Any:
    """The default of a rule's constructor option, as the registered rule declares it."""
    cls = available_rules().get(rule_name)
    if cls is None:
        return None
    parameter = inspect.signature(cls.__init__).parameters.get(option)
    return None if parameter is None else parameter.default
