"""LoRA pairs and how to find them in a model.

A pair adapts a frozen weight ``W0 (m, n)`` as ``W = W0 + scale * b @ a`` with ``b (m, r)`` and
``a (r, n)``. Pairs are found from modules (peft LoRA layers, :class:`LoRALinear`, or anything
meeting :class:`HasLoRAPairs`), never by matching parameter names; names are for messages only.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from einops import rearrange
from torch import Tensor, nn

from .quantized import dequantized, logical_shape, project_rows

__all__ = [
    "label",
    "base_products_from",
    "new_pairs_among",
    "LoRAPair",
    "LoRALinear",
    "HasLoRAPairs",
    "find_lora_pairs",
    "inject_lora",
]


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
        base_layer: the module that holds ``base_weight``, where a quantized layer may keep what
            reading it needs (bitsandbytes' 8-bit layer moves the scales to its ``state`` at the
            first forward).
    """

    a: Tensor
    b: Tensor
    scale: float
    base_weight: Tensor | None = None
    name: str = ""
    base_transposed: bool = False
    base_layer: nn.Module | None = None

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
            base_shape = logical_shape(self.base_weight, label)
            lead = n if self.base_transposed else m
            if math.prod(base_shape) != m * n or (base_shape and base_shape[0] != lead):
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
        """``W0`` as the ``(m, n)`` matrix (detached), read from the live tensor; ``None`` without one.

        A bitsandbytes-quantized base is dequantized whole here, on each call, to its compute dtype
        (4-bit) or float32 (8-bit): for rules that need ``W0`` itself. The built-in rules need only
        :meth:`base_products`, which never holds more than a block of it.
        """
        if self.base_weight is None:
            return None
        w = dequantized(self.base_weight, self.name or "base_matrix", self.base_layer)
        if self.base_transposed:
            return rearrange(w, "n m -> m n")
        return rearrange(w, "m ... -> m (...)")

    def base_products(self, block_elements: int | None = None) -> Tensor | None:
        """``(||W0||^2, <W0, b a>)`` as a float64 ``(2,)`` tensor, from the live tensors; ``None``
        without a base weight.

        ``W0`` is read ``block_elements`` at a time (by default
        :func:`~lowrank_opt.quantized.block_elements` of its device) in its stored layout (a quantized base is
        dequantized block by block, :func:`~lowrank_opt.quantized.project_rows`): with ``R`` the
        factor along its stored rows, ``<W0, b a> = <R^T W0, P>``, where ``R = b, P = a`` for ``W0``
        stored ``(m, n)`` and ``R = a^T, P = b^T`` for ``W0^T`` stored ``(n, m)``. Float64 makes
        the result independent, to float64 rounding, of how the rows are split (blocks here,
        shards under FSDP2): the same float32 value either way.
        """
        if self.base_weight is None:
            return None
        rows, partner = self.base_row_factors(self.a.detach(), self.b.detach())
        return base_products_from(*self.project_base(self.base_weight, rows, block_elements), partner)

    def base_row_factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, P)`` of :meth:`base_products` from factors shaped like ``a`` and ``b``, as views of
        them: ``R`` runs along the stored rows of ``W0`` (``b`` or ``a^T``), ``P`` is the other one."""
        a, b = self.matrix_a(a), self.matrix_b(b)
        return (a.T, b.T) if self.base_transposed else (b, a)

    def project_base(self, weight: Tensor, rows: Tensor, block_elements: int | None = None) -> tuple[Tensor, Tensor]:
        """``(||W||^2, R^T W)`` of ``W0``, or of a block of its stored rows, ``weight``, against the
        same rows of ``R`` (:meth:`base_row_factors`), in float64; ``P`` keeps its own dtype, since
        its products with the float64 ``R^T W`` are float64 all the same."""
        return project_rows(weight, rows.double(), block_elements, self.name or "base_weight", self.base_layer)


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


def _supported_peft_layers() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """peft's LoRA layer classes this module lifts: ``(linear, embedding, conv)``.

    bitsandbytes layers are looked up only once bitsandbytes is imported: a model with such
    layers has imported it, and importing it otherwise is slow and needs CUDA.
    """
    from peft.tuners.lora import layer as lora_layer

    linear: tuple[type, ...] = (lora_layer.Linear,)
    if "bitsandbytes" in sys.modules:
        from peft.tuners.lora import bnb as lora_bnb

        linear += tuple(
            cls for cls in (getattr(lora_bnb, "Linear8bitLt", None), getattr(lora_bnb, "Linear4bit", None)) if cls
        )
    conv = tuple(getattr(lora_layer, name) for name in ("Conv1d", "Conv2d", "Conv3d") if hasattr(lora_layer, name))
    return linear, (lora_layer.Embedding,), conv


def _plain_or_dora(layer: Any, adapter: str) -> str | None:
    """``None`` when the adapter is ``s B A`` up to DoRA's magnitude, else the name of its variant."""
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is None:
        return None  # plain LoRA, or DoRA in peft versions before variants (flagged by use_dora)
    from peft.tuners.lora import variants

    dora = tuple(
        getattr(variants, name)
        for name in (
            "DoraLinearVariant",
            "DoraEmbeddingVariant",
            "DoraConv1dVariant",
            "DoraConv2dVariant",
            "DoraConv3dVariant",
        )
        if hasattr(variants, name)
    )
    return None if isinstance(variant, dora) else type(variant).__name__


def _peft_pairs(module: nn.Module, module_name: str) -> tuple[list[LoRAPair], list[str]] | None:
    """``(pairs, refusals)`` of a peft LoRA layer, or ``None`` when ``module`` is not one.

    A refusal names a trainable adapter this module cannot lift and says why. DoRA adapters are
    lifted as their plain ``s B A`` part: the magnitude vector is an ordinary parameter.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return None
    if not isinstance(module, LoraLayer):
        return None
    layer: Any = module  # peft's attributes are untyped
    linear, embedding, conv = _supported_peft_layers()
    if not isinstance(module, linear + embedding + conv):
        trainable = [name for name, sub in layer.lora_A.items() if any(p.requires_grad for p in sub.parameters())]
        trainable += [name for name, p in layer.lora_embedding_A.items() if p.requires_grad]
        reason = f"{type(module).__name__} layers are not supported"
        return [], [f"{module_name} (adapter {name!r}): {reason}" for name in trainable]
    if isinstance(module, embedding):
        factors = {
            name: (layer.lora_embedding_A[name], layer.lora_embedding_B[name]) for name in layer.lora_embedding_A
        }
    else:
        factors = {name: (layer.lora_A[name].weight, layer.lora_B[name].weight) for name in layer.lora_A}
    pairs: list[LoRAPair] = []
    refusals: list[str] = []
    for adapter, (a, b) in factors.items():
        if not (a.requires_grad or b.requires_grad):
            continue
        label = f"{module_name} (adapter {adapter!r})"
        base = layer.get_base_layer()
        variant = _plain_or_dora(layer, adapter)
        if variant is not None:
            refusals.append(f"{label}: the LoRA variant {variant} is not supported")
            continue
        if isinstance(module, conv) and base.groups != 1:
            refusals.append(f"{label}: a grouped convolution (groups={base.groups}) is not a product b @ a")
            continue
        if not isinstance(module, embedding):
            lora_b = layer.lora_B[adapter]
            if getattr(lora_b, "bias", None) is not None and lora_b.bias.requires_grad:
                warnings.warn(f"{label}: the lora_B bias trains as an ordinary parameter", stacklevel=4)
        # An embedding's delta is (B A)^T, shaped like its (num_embeddings, dim) weight; fan_in_fan_out
        # layers (GPT-2's Conv1D) also hold W0^T.
        transposed = isinstance(module, embedding) or bool(getattr(layer, "fan_in_fan_out", False))
        pairs.append(
            LoRAPair(
                a, b, float(layer.scaling[adapter]), base.weight, label, base_transposed=transposed, base_layer=base
            )
        )
    return pairs, refusals


def find_lora_pairs(
    model_or_pairs: nn.Module | Iterable[LoRAPair], *, unsupported: Literal["error", "base"] = "error"
) -> list[LoRAPair]:
    """Every trainable LoRA pair of a model, or the given pairs checked.

    Recognises peft LoRA layers (Linear, ``fan_in_fan_out`` Linear, Embedding, Conv1d/2d/3d,
    bitsandbytes 8-bit and 4-bit Linear; every trainable adapter; DoRA as its ``s B A`` part; the
    scale from the layer, rsLoRA included; the frozen base weight attached),
    :class:`LoRALinear`, and any module meeting :class:`HasLoRAPairs`.

    Args:
        model_or_pairs: a model, or :class:`LoRAPair` objects.
        unsupported: what to do with a trainable peft adapter that is not a product ``s B A``
            (other LoRA variants, grouped convolutions, peft layer types not listed above):
            ``"error"`` raises ``ValueError`` naming each; ``"base"`` leaves its factors to the base
            optimizer, as ordinary parameters, with one warning listing them.

    Raises ``ValueError`` when no pair is found or a factor is in two pairs.
    """
    if unsupported not in ("error", "base"):
        raise ValueError(f"unsupported must be 'error' or 'base', got {unsupported!r}")
    if isinstance(model_or_pairs, nn.Module):
        found: list[LoRAPair] = []
        refused: list[str] = []
        for name, module in model_or_pairs.named_modules():
            peft_found = _peft_pairs(module, name)
            if peft_found is not None:
                found.extend(peft_found[0])
                refused.extend(peft_found[1])
            elif isinstance(module, HasLoRAPairs):
                for pair in module.lora_pairs():
                    if pair.a.requires_grad or pair.b.requires_grad:
                        named = pair.name or name or type(module).__name__
                        found.append(replace(pair, name=named))
        if refused and unsupported == "error":
            raise ValueError(
                "LoRA layers that cannot be lifted (pass unsupported='base' to train them with the base "
                "optimizer as ordinary parameters): " + "; ".join(refused)
            )
        if refused:
            warnings.warn(
                "these LoRA factors are trained by the base optimizer as ordinary parameters: " + "; ".join(refused),
                stacklevel=2,
            )
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
            if factor in owner:
                raise ValueError(f"a factor of {label(pair, i)} is already in {owner[factor]}")
            owner[factor] = label(pair, i)
    return pairs


def label(pair: LoRAPair, index: int) -> str:
    """How messages name pair ``index``: its name, else its position."""
    return pair.name or f"pair {index}"


def base_products_from(sq_norm: Tensor, projected: Tensor, partner: Tensor) -> Tensor:
    """``(||W0||^2, <W0, b a>)`` (2,) from ``||W0||^2``, ``R^T W0`` and the partner ``P`` of
    :meth:`LoRAPair.base_row_factors`: ``<W0, b a> = <R^T W0, P>``."""
    return torch.stack((sq_norm, (projected.view_as(partner) * partner).sum()))


def new_pairs_among(
    model: nn.Module, added: Iterable[Tensor], known: Iterable[Tensor], unsupported: Literal["error", "base"] = "error"
) -> list[LoRAPair]:
    """The pairs of ``model`` whose two factors are among ``added`` and not among ``known``.

    For a param group added to an optimizer after it was built; a pair with one factor added and
    the other not is refused (``ValueError``), since half a pair cannot be lifted."""
    ids, known_ids = {id(p) for p in added}, {id(p) for p in known}
    fresh = []
    for pair in find_lora_pairs(model, unsupported=unsupported):
        inside = (id(pair.a) in ids, id(pair.b) in ids)
        if id(pair.a) in known_ids or not any(inside):
            continue
        if not all(inside):
            raise ValueError(f"{pair.name}: add both LoRA factors of a pair in the same param group")
        fresh.append(pair)
    return fresh
