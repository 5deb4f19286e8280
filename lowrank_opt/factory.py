"""``build``: the wrapper from a model and an optimizer class, for APIs that take a class plus keyword arguments."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn
from torch.optim import Optimizer

from .rule import CalibrationRule
from .wrapper import LowRankWrapper

__all__ = ["build", "wrapper_option_names"]

# Arguments of LowRankWrapper that build() fills itself or takes by name.
_NOT_OPTIONS = {"self", "base_optimizer", "model_or_pairs", "rule", "rule_options"}


def wrapper_option_names() -> frozenset[str]:
    """The keyword options of :class:`~lowrank_opt.LowRankWrapper` that :func:`build` routes to it."""
    parameters = inspect.signature(LowRankWrapper.__init__).parameters
    return frozenset(name for name in parameters if name not in _NOT_OPTIONS)


def _resolve_class(optimizer_cls: type[Optimizer] | str) -> type[Optimizer]:
    if isinstance(optimizer_cls, str):
        module_name, _, attr = optimizer_cls.rpartition(".")
        if not module_name:
            raise ValueError(
                f"optimizer_cls must be a class or a dotted path like 'torch.optim.AdamW', got {optimizer_cls!r}"
            )
        try:
            resolved = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"optimizer_cls {optimizer_cls!r} cannot be imported: {error}") from None
    else:
        resolved = optimizer_cls
    if not (isinstance(resolved, type) and issubclass(resolved, Optimizer)):
        raise ValueError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(resolved, LowRankWrapper):
        raise ValueError("optimizer_cls is the base optimizer's class; build() adds the LowRankWrapper itself")
    return resolved


def build(
    model: nn.Module,
    optimizer_cls: type[Optimizer] | str,
    *,
    rule: CalibrationRule | str | type[CalibrationRule] | None = None,
    rule_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> LowRankWrapper:
    """Build ``optimizer_cls`` over the trainable parameters of ``model`` and wrap it.

    ``lowrank_opt.build(model, torch.optim.AdamW, lr=2e-4, weight_decay=0.01, max_grad_norm=1.0)``
    is ``LowRankWrapper(torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01), model, max_grad_norm=1.0)``.

    Args:
        model: the model; its parameters with ``requires_grad`` form one param group, and its
            LoRA pairs are found with :func:`~lowrank_opt.find_lora_pairs`.
        optimizer_cls: the base optimizer class, or its dotted import path (``"torch.optim.AdamW"``),
            as configuration files give it.
        rule, rule_options: as in :class:`~lowrank_opt.LowRankWrapper`.
        **kwargs: split by name: a keyword option of :class:`~lowrank_opt.LowRankWrapper`
            (:func:`wrapper_option_names`: ``schedule``, ``max_grad_norm``, ...) goes to the
            wrapper; every other keyword goes to ``optimizer_cls``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    cls = _resolve_class(optimizer_cls)
    options = wrapper_option_names()
    wrapper_kwargs = {key: value for key, value in kwargs.items() if key in options}
    optimizer_kwargs = {key: value for key, value in kwargs.items() if key not in options}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad")
    try:
        base = cls(trainable, **optimizer_kwargs)
    except TypeError as error:
        raise ValueError(
            f"{cls.__name__} rejected {sorted(optimizer_kwargs)} ({error}); LowRankWrapper options are {sorted(options)}"
        ) from None
    return LowRankWrapper(base, model, rule, rule_options=rule_options, **wrapper_kwargs)
