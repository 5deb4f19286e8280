"""LoRA pairs and how to find them in a model.

A pair adapts a frozen weight ``W0 (m, n)`` as ``W = W0 + scale * b @ a`` with ``b (m, r)`` and
``a (r, n)``. Pairs are found from modules (peft LoRA layers, :class:`LoRALinear`, or anything
meeting :class:`HasLoRAPairs`), never by matching parameter names; names are for messages only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["LoRAPair", "LoRALinear", "HasLoRAPairs", "find_lora_pairs", "inject_lora"]


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """One adapted weight: ``W = W0 + scale * b @ a``, with ``W0`` the frozen base weight.

    Args:
        a: the factor parameter whose matrix is ``(r, n)`` (peft's ``lora_A``). Trailing
            dimensions are flattened in order: a conv ``lora_A`` of shape ``(r, c_in, kh, kw)`` is
            the matrix ``(r, c_in kh kw)``.
        b: the factor parameter whose matrix is ``(m, r)`` (peft's ``lora_B``); trailing
            dimensions must be 1 (a ``1 x 1`` conv kernel).
        scale: ``s``; peft's ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with rsLoRA).
        base_weight: the frozen weight, if there is one, with ``m n`` elements: ``(m, n)``, or
            ``(m, ...)`` flattened like ``a``, or ``(n, m)`` with ``base_transposed``. It is read
            through :meth:`base_matrix` at the moment it is needed, so the pair follows the live
            tensor (keep the module's own parameter here, not a copy).
        name: used in messages only.
        base_transposed: ``base_weight`` holds ``W0^T`` (peft's ``fan_in_fan_out`` layers and
            embeddings, whose weight is ``(num_embeddings, dim)`` while ``delta W`` is ``(dim, num_embeddings)``).
    """

    a: Tensor
    b: Tensor
    scale: float
    base_weight: Tensor | None = None
    name: str = ""
    base_transposed: bool = False

    def __post_init__(self) -> None:
        label = self.name or "LoRAPair"
        for factor, which in ((self.a, "a"), (self.b, "b")):
            if not isinstance(factor, Tensor) or factor.ndim < 2:
                raise ValueError(
                    f"{label}: factor {which} must be a tensor with at least 2 dimensions, got {_describe(factor)}"
                )
            if not factor.is_floating_point():
                raise ValueError(f"{label}: factor {which} must be floating point, got {factor.dtype}")
        if self.a is self.b:
            raise ValueError(f"{label}: a and b are the same tensor")
        if self.b.shape[1] != self.a.shape[0] or any(d != 1 for d in self.b.shape[2:]):
            raise ValueError(
                f"{label}: rank mismatch, b is {tuple(self.b.shape)} (m, r) but a is {tuple(self.a.shape)} (r, n)"
            )
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"{label}: scale must be a finite non-zero number, got {self.scale!r}")
        if self.base_weight is not None:
            m, n = self.full_shape
            base_shape = tuple(self.base_weight.shape)
            lead = n if self.base_transposed else m
            if self.base_weight.numel() != m * n or (base_shape and base_shape[0] != lead):
                raise ValueError(f"{label}: base_weight is {base_shape} but b @ a is {self.full_shape}")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the adapted weight as a matrix."""
        return (self.b.shape[0], math.prod(self.a.shape[1:]))

    def matrix_a(self, t: Tensor) -> Tensor:
        """A tensor shaped like ``a`` seen as the ``(r, n)`` matrix (a view)."""
        return t if t.ndim == 2 else rearrange(t, "r ... -> r (...)")

    def matrix_b(self, t: Tensor) -> Tensor:
        """A tensor shaped like ``b`` seen as the ``(m, r)`` matrix (a view)."""
        return t if t.ndim == 2 else rearrange(t, "m r ... -> m (r ...)")

    def base_matrix(self) -> Tensor | None:
        """``W0`` as the ``(m, n)`` matrix (detached), read from the live tensor; ``None`` without one."""
        if self.base_weight is None:
            return None
        w = self.base_weight.detach()
        if self.base_transposed:
            return rearrange(w, "n m -> m n")
        return rearrange(w, "m ... -> m (...)")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


@runtime_checkable
class HasLoRAPairs(Protocol):
    """A module that states its own LoRA pairs; :func:`find_lora_pairs` asks it directly."""

    def lora_pairs(self) -> Iterable[LoRAPair]: ...


class LoRALinear(nn.Module):
    """``y = base(x) + scale * (x @ a^T) @ b^T`` with ``scale = alpha / rank``.

    For users without peft. ``a`` starts Kaiming-uniform and ``b`` at zero (peft's default), so the
    wrapped layer starts equal to ``base``, whose parameters are frozen.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(alpha if alpha is not None else rank) / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b)

    def lora_pairs(self) -> Iterator[LoRAPair]:
        yield LoRAPair(self.lora_a, self.lora_b, self.scale, self.base.weight)

    def extra_repr(self) -> str:
        return f"rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def inject_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    target: Callable[[str, nn.Linear], bool] = lambda name, module: True,
) -> nn.Module:
    """Replace every ``nn.Linear`` accepted by ``target(name, module)`` with a :class:`LoRALinear`.

    Every other parameter of ``model`` is frozen. Returns ``model`` (changed in place).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and target(name, module)
    ]
    if not chosen:
        raise ValueError(f"inject_lora: no nn.Linear in {type(model).__name__} was accepted by target")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha))
    return model


def _peft_pairs(module: nn.Module, module_name: str) -> list[LoRAPair] | None:
    """Pairs of a peft LoRA layer, or ``None`` when ``module`` is not one."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    if not isinstance(module, LoraLayer):
        return None
    layer: Any = module  # peft's attributes are untyped
    pairs = []
    for adapter, lora_a in layer.lora_A.items():
        lora_b = layer.lora_B[adapter]
        a, b = lora_a.weight, lora_b.weight
        if not (a.requires_grad or b.requires_grad):
            continue
        label = f"{module_name} (adapter {adapter!r})"
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(
                f"{label}: only peft LoRA Linear layers are supported, got {type(module).__name__} "
                f"with factors of shape {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if adapter in layer.lora_magnitude_vector or layer.lora_variant.get(adapter) is not None:
            raise ValueError(f"{label}: LoRA variants such as DoRA are not supported, only plain LoRA pairs")
        if getattr(lora_b, "bias", None) is not None and lora_b.bias.requires_grad:
            warnings.warn(f"{label}: the lora_B bias trains as an ordinary parameter", stacklevel=3)
        base = layer.get_base_layer().weight
        transposed = bool(getattr(layer, "fan_in_fan_out", False))
        pairs.append(LoRAPair(a, b, float(layer.scaling[adapter]), base, label, base_transposed=transposed))
    return pairs


def find_lora_pairs(model_or_pairs: nn.Module | Iterable[LoRAPair]) -> list[LoRAPair]:
    """Every trainable LoRA pair of a model, or the given pairs checked.

    Recognises peft LoRA layers (every trainable adapter; scale from the layer, rsLoRA included;
    the frozen base weight attached), :class:`LoRALinear`, and any module meeting
    :class:`HasLoRAPairs`. Raises ``ValueError`` when none is found or a factor is in two pairs.
    """
    if isinstance(model_or_pairs, nn.Module):
        found: list[LoRAPair] = []
        for name, module in model_or_pairs.named_modules():
            peft_pairs = _peft_pairs(module, name)
            if peft_pairs is not None:
                found.extend(peft_pairs)
            elif isinstance(module, HasLoRAPairs):
                for pair in module.lora_pairs():
                    if pair.a.requires_grad or pair.b.requires_grad:
                        label = pair.name or name or type(module).__name__
                        found.append(replace(pair, name=label))
        if not found:
            raise ValueError(
                f"no trainable LoRA pair found in {type(model_or_pairs).__name__}: expected peft LoRA "
                "layers, lowrank_opt.LoRALinear, or modules with a lora_pairs() method"
            )
        pairs = found
    else:
        pairs = list(model_or_pairs)
        if not pairs:
            raise ValueError("no LoRA pair given")
        for pair in pairs:
            if not isinstance(pair, LoRAPair):
                raise ValueError(f"expected LoRAPair objects, got {type(pair).__name__}")
    owner: dict[Tensor, str] = {}
    for i, pair in enumerate(pairs):
        for factor in (pair.a, pair.b):
            label = pair.name or f"pair {i}"
            if factor in owner:
                raise ValueError(f"a factor of {label} is already in {owner[factor]}")
            owner[factor] = label
    return pairs
