r"""``MuonWithAdamW``: one optimizer, Muon for chosen matrices and AdamW for everything else.

``torch.optim.Muon`` accepts only 2-D parameters, so a model with biases, norms, embeddings or a
classifier head needs a second optimizer for them. This class holds both parts in one
``torch.optim.Optimizer``: every param group carries a ``use_muon`` flag and its own
hyperparameters (``lr`` included), so one ``state_dict`` covers both parts and an LR scheduler
scales both. It subclasses ``torch.optim.Muon``, so :class:`~lowrank_opt.LowRankWrapper` picks
the ``loft_muon`` rule for it from its class; the LoRA factors must then sit in Muon groups.

A step runs torch's own implementations on each part, group by group:

* ``use_muon=True`` groups: the functional Muon step of ``torch.optim.Muon``,
  ``B <- mu B + (1 - mu) g``, ``O = NS(g + mu (B - g))`` (or ``NS(B)`` without Nesterov),
  ``W <- W (1 - lr lambda) - rho(m, n) lr O`` with torch's shape adjustment ``rho``;
* ``use_muon=False`` groups: the functional AdamW step of ``torch.optim.AdamW``
  (``torch.optim.adamw.adamw``), with torch's default choice of implementation.

The defaults differ between the parts as they do between the two torch optimizers: weight decay
0.1 for Muon and 0.01 for AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, muon
from torch.optim.adamw import adamw

from .pairs import find_lora_pairs

__all__ = ["MuonWithAdamW"]

USE_MUON = "use_muon"
_ADJUST_LR = (None, "original", "match_rms_adamw")
# Hyperparameters that only one part reads: a group of the other part naming one is a mistake.
_MUON_ONLY = frozenset({"momentum", "nesterov", "ns_coefficients", "ns_steps", "adjust_lr_fn"})
_ADAMW_ONLY = frozenset({"betas", "amsgrad"})


class MuonWithAdamW(torch.optim.Muon):
    r"""Muon on the param groups flagged ``use_muon=True``, AdamW on the others.

    Args:
        params: param groups (dicts), each with ``"params"`` and a boolean ``"use_muon"``, and
            optionally its own hyperparameters. A Muon group holds only 2-D parameters. Use
            :meth:`from_model` to build the groups from a model.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: the
            defaults of the Muon groups, as in ``torch.optim.Muon``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay, adamw_amsgrad: the defaults of the
            AdamW groups (stored there as ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``amsgrad``), as in ``torch.optim.AdamW``.

    The AdamW part runs torch's default implementation for the parameters' device (single-tensor
    on CPU, for-each on accelerators); the fused and capturable variants are not offered.
    ``defaults`` holds the Muon part's defaults, ``adamw_defaults`` the AdamW part's.
    """

    def __init__(
        self,
        params: Iterable[Mapping[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 1e-2,
        adamw_amsgrad: bool = False,
    ) -> None:
        self.adamw_defaults: dict[str, Any] = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
            "amsgrad": adamw_amsgrad,
        }
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        if isinstance(params, Tensor):
            raise ValueError("params must be param groups with a 'use_muon' flag, got a tensor")
        groups = [dict(group) if isinstance(group, Mapping) else group for group in params]
        # torch.optim.Muon.__init__ refuses non-2-D parameters in every group; the checks it makes
        # are done per group, by part, in add_param_group.
        torch.optim.Optimizer.__init__(self, groups, defaults)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        muon_params: Callable[[str, nn.Parameter], bool] | None = None,
        lora: bool = True,
        **hyperparameters: Any,
    ) -> MuonWithAdamW:
        """Build the optimizer over every trainable parameter of ``model``.

        Muon gets the factors of every LoRA pair (found by :func:`~lowrank_opt.find_lora_pairs`,
        when ``lora``) and every parameter for which ``muon_params(name, parameter)`` is true
        (it must be 2-D); AdamW gets every other trainable parameter. Frozen parameters are left
        out. ``hyperparameters`` go to the constructor (``lr=...``, ``adamw_lr=...``).

        Example::

            opt = MuonWithAdamW.from_model(model, lr=3e-2, adamw_lr=1e-3)
            opt = lowrank_opt.LowRankWrapper(opt, model)  # loft_muon on the factors
        """
        muon_set: set[Tensor] = set()
        if lora:
            muon_set = {factor for pair in find_lora_pairs(model) for factor in (pair.a, pair.b)}
        muon_group: list[nn.Parameter] = []
        adamw_group: list[nn.Parameter] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            chosen = muon_params is not None and muon_params(name, param)
            if chosen and param.ndim != 2:
                raise ValueError(
                    f"muon_params chose parameter {name!r} of shape {tuple(param.shape)}; Muon steps only 2-D matrices"
                )
            (muon_group if chosen or param in muon_set else adamw_group).append(param)
        groups = [
            {"params": group, USE_MUON: flag} for flag, group in ((True, muon_group), (False, adamw_group)) if group
        ]
        if not groups:
            raise ValueError(f"{type(model).__name__} has no trainable parameter")
        return cls(groups, **hyperparameters)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``use_muon`` flag says which part's defaults and checks apply."""
        index = len(self.param_groups)
        flag = param_group.get(USE_MUON)
        if not isinstance(flag, bool):
            raise ValueError(
                f"param group {index} needs a boolean 'use_muon' (True: Muon, False: AdamW), got {flag!r}; "
                "MuonWithAdamW.from_model(model) builds the groups from a model"
            )
        defaults = self.defaults if flag else self.adamw_defaults
        foreign = sorted(set(param_group) & (_ADAMW_ONLY if flag else _MUON_ONLY))
        if foreign:
            part = "a Muon" if flag else "an AdamW"
            raise ValueError(f"param group {index} is {part} group but sets {', '.join(foreign)}")
        group = {**defaults, **param_group}
        params = group.get("params")
        if isinstance(params, Tensor):
            group["params"] = [params]
        elif params is not None and not isinstance(params, set):  # torch refuses sets, with its own message
            group["params"] = list(params)  # a generator is read once, here
        (_check_muon_group if flag else _check_adamw_group)(group, index)
        known = set(group)
        super().add_param_group(group)
        # torch fills missing keys from self.defaults, the Muon part's: an AdamW group keeps its own.
        added = self.param_groups[-1]
        for key in set(added) - known:
            del added[key]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of an optimizer with the same groups, each in the same part."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                if saved.get(USE_MUON) != group[USE_MUON]:
                    raise ValueError(
                        f"param group {i} has use_muon={group[USE_MUON]} but the state dict's has "
                        f"use_muon={saved.get(USE_MUON)!r}"
                    )
        super().load_state_dict(state_dict)  # torch checks group and parameter counts

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step: torch's Muon on the Muon groups, torch's AdamW on the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group[USE_MUON]:
                self._muon_group_step(group)
            else:
                self._adamw_group_step(group)
        return loss

    def _muon_group_step(self, group: dict[str, Any]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        buffers: list[Tensor] = []
        has_complex = self._init_group(group, params, grads, buffers)
        muon(
            params,
            grads,
            buffers,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            ns_steps=group["ns_steps"],
            adjust_lr_fn=group["adjust_lr_fn"],
            has_complex=has_complex,
        )

    def _adamw_group_step(self, group: dict[str, Any]) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MuonWithAdamW does not support sparse gradients")
            has_complex |= torch.is_complex(p)
            params.append(p)
            grads.append(p.grad)
            state = self.state[p]
            if "step" not in state:
                # As torch.optim.AdamW lays its state out (not capturable, not fused): step on the CPU.
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            has_complex=has_complex,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _scalar_dtype() -> torch.dtype:
    """The dtype torch's Adam gives its step counter."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _check_number(group: Mapping[str, Any], key: str, index: int, part: str) -> None:
    value = group[key]
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"param group {index} ({part}): tensor {key} must have one element, got {value.numel()}")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"param group {index} ({part}): {key} must be a number >= 0, got {value!r}")


def _check_muon_group(group: Mapping[str, Any], index: int) -> None:
    for key in ("lr", "weight_decay", "momentum", "eps"):
        _check_number(group, key, index, "Muon")
    if group["adjust_lr_fn"] not in _ADJUST_LR:
        raise ValueError(
            f"param group {index} (Muon): adjust_lr_fn must be one of {_ADJUST_LR}, got {group['adjust_lr_fn']!r}"
        )
    steps = group["ns_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100:
        raise ValueError(f"param group {index} (Muon): ns_steps must be an integer in [0, 100), got {steps!r}")
    if len(group["ns_coefficients"]) != 3:
        raise ValueError(
            f"param group {index} (Muon): ns_coefficients must be three numbers, got {group['ns_coefficients']!r}"
        )
    for j, p in enumerate(group.get("params") or ()):
        if isinstance(p, Tensor) and p.ndim != 2:
            raise ValueError(
                f"param group {index} (Muon): parameter {j} has shape {tuple(p.shape)}; Muon steps only 2-D "
                "matrices, put it in a group with use_muon=False"
            )


def _check_adamw_group(group: Mapping[str, Any], index: int) -> None:
    for key in ("lr", "weight_decay", "eps"):
        _check_number(group, key, index, "AdamW")
    betas = group["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"param group {index} (AdamW): betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(group["amsgrad"], bool):
        raise ValueError(f"param group {index} (AdamW): amsgrad must be a bool, got {group['amsgrad']!r}")
