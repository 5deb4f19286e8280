"""Frozen base weights read block by block: plain floating-point tensors and bitsandbytes' quantized ones.

A rule that needs the base weight ``W0`` needs it only through reductions (``||W0||^2`` and
``R^T W0`` for a thin factor ``R``), so ``W0`` is read a block of consecutive stored rows at a
time. A floating-point weight is sliced (no copy); a quantized one (QLoRA) is dequantized one
block at a time, so at most one block of floating-point values exists at once, never the matrix:

* bitsandbytes 8-bit (``Int8Params``): row-wise absmax, ``W[i] = CB[i] SCB[i] / 127``;
* bitsandbytes 4-bit (``Params4bit``, NF4 or FP4): ``W`` flattened row-major in blocks of
  ``blocksize`` elements, each scaled by its absmax (itself 8-bit quantized with a second
  state when ``compress_statistics``); a block of rows whose first element starts a
  quantization block is dequantized alone, with the slice of the (dequantized) absmax it covers.

bitsandbytes is imported only for a weight that is not floating point, which only it makes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "ACCELERATOR_BLOCK_ELEMENTS",
    "BLOCK_ELEMENTS",
    "block_elements",
    "dequantized",
    "logical_shape",
    "project_rows",
    "row_blocks",
]

# Elements of ``W0`` a reduction holds at once in floating point (each block is copied to float64
# for the products): 256 KiB on a CPU (as fast as larger blocks there, 2^14 is 25% slower); 32 MiB
# on an accelerator, where a small kernel costs more.
BLOCK_ELEMENTS = 1 << 15
ACCELERATOR_BLOCK_ELEMENTS = 1 << 22


def block_elements(device: torch.device) -> int:
    """The default block size of the reductions on ``device``."""
    return BLOCK_ELEMENTS if device.type == "cpu" else ACCELERATOR_BLOCK_ELEMENTS


def _bitsandbytes(weight: Tensor, label: str) -> Any:
    """The bitsandbytes module, for a base weight that is not floating point (only it makes such bases)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ValueError(
            f"{label}: base_weight of dtype {weight.dtype} is neither floating point nor a bitsandbytes quantized weight"
        ) from None
    return bitsandbytes


def _four_bit_state(weight: Tensor, label: str) -> Any:
    """The quant state of a bitsandbytes 4-bit weight, or ``None`` for another weight."""
    bnb = _bitsandbytes(weight, label)
    if not isinstance(weight, bnb.nn.Params4bit) or weight.quant_state is None:
        return None
    return weight.quant_state


def _standard_packing(weight: Tensor, state: Any, label: str) -> tuple[Tensor, Any]:
    """The 4-bit codes and quant state in bitsandbytes' standard packing (row-major pairs of codes).

    A forward in eval mode without gradients on a CPU with AVX512-BF16 repacks a 4-bit weight for
    inference (``packing_format_for_cpu``); its inverse is then applied to a copy of the quant
    state (the codes are copied at their 4-bit size, the layer keeps its packing)."""
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.detach().reshape(-1), state
    from bitsandbytes import functional

    inverse = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise ValueError(f"{label}: this bitsandbytes cannot undo its CPU inference packing of the 4-bit base weight")
    codes, standard = inverse(weight.detach(), copy.copy(state))
    if standard.absmax.ndim == 2:  # left (blocks per row, rows) by the inverse when not nested
        standard.absmax = rearrange(standard.absmax, "blocks rows -> (rows blocks)").float()
    return codes.reshape(-1), standard


def logical_shape(weight: Tensor, label: str) -> tuple[int, ...]:
    """The shape of the weight a base holds; a 4-bit weight stores it packed, in its quant state."""
    if not weight.is_floating_point():
        state = _four_bit_state(weight, label)
        if state is not None:
            return tuple(state.shape)
    return tuple(weight.shape)


def _int8_scales(weight: Tensor, layer: Any) -> Tensor | None:
    """The row scales of a bitsandbytes 8-bit weight: on the weight until the layer's first
    forward, then in the layer's ``state``."""
    scales = getattr(weight, "SCB", None)
    if scales is None and layer is not None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    return scales


def row_blocks(
    weight: Tensor, max_elements: int = BLOCK_ELEMENTS, label: str = "base_weight", layer: Any = None
) -> Iterator[Tensor]:
    """The stored weight as a matrix ``(rows, cols)`` (trailing dimensions flattened), in blocks of
    consecutive rows, each a floating-point ``(rows_k, cols)`` tensor of at most ``max_elements``
    elements (at least one row, more where a 4-bit block must start on a quantization block).

    Detached; slices of a floating-point weight, dequantized copies of a quantized one. ``layer``:
    the module holding ``weight``, where bitsandbytes' 8-bit layer keeps the scales after a forward.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements!r}")
    shape = logical_shape(weight, label)
    rows = shape[0] if shape else 1
    cols = math.prod(shape[1:])
    step = max(1, max_elements // max(cols, 1))  # rows per block, where any row may start one
    if weight.is_floating_point():
        matrix = weight.detach().reshape(rows, cols)
        for start in range(0, rows, step):
            yield matrix[start : start + step]
        return
    state = _four_bit_state(weight, label)
    if state is not None:
        yield from _four_bit_blocks(*_standard_packing(weight, state, label), rows, cols, max_elements)
        return
    bnb = _bitsandbytes(weight, label)
    scales = _int8_scales(weight, layer) if isinstance(weight, bnb.nn.Int8Params) else None
    if scales is not None:
        scales = scales.detach().float() / 127
        codes = weight.detach().reshape(rows, cols)
        for start in range(0, rows, step):
            yield codes[start : start + step].float() * scales[start : start + step, None]
        return
    raise ValueError(f"{label}: a {type(weight).__name__} base weight of dtype {weight.dtype} cannot be dequantized")


def _four_bit_blocks(packed: Tensor, state: Any, rows: int, cols: int, max_elements: int) -> Iterator[Tensor]:
    """Row blocks of a 4-bit weight (``packed``: its codes, two per byte, row-major), each
    dequantized alone (see the module docstring)."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    size = state.blocksize
    # Rows per block: a multiple of the rows after which a quantization block starts again.
    aligned = size // math.gcd(cols, size)
    step = max(aligned, max_elements // max(cols, 1) // aligned * aligned)
    absmax = state.absmax
    if state.nested:  # the absmax values are quantized too: dequantize them once (m n / blocksize of them)
        from bitsandbytes.functional import dequantize_blockwise

        absmax = (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    with torch.no_grad():
        for start in range(0, rows, step):
            count = min(step, rows - start)
            first, last = start * cols, (start + count) * cols  # elements [first, last)
            # A flat shape: bitsandbytes' CPU kernel misreads 2-D shapes whose rows are not whole blocks.
            part = QuantState(
                absmax=absmax[first // size : -(-last // size)],
                shape=torch.Size((count * cols,)),
                code=state.code,
                blocksize=size,
                quant_type=state.quant_type,
                dtype=state.dtype,
            )
            flat = dequantize_4bit(packed[first // 2 : -(-last // 2)].reshape(-1, 1), part)
            yield rearrange(flat, "... (rows cols) -> (... rows) cols", cols=cols)


def dequantized(weight: Tensor, label: str = "base_weight", layer: Any = None) -> Tensor:
    """The whole weight as a floating-point tensor of its logical shape: ``weight`` itself (detached)
    when floating point, else the row blocks of :func:`row_blocks` laid end to end."""
    if weight.is_floating_point():
        return weight.detach()
    shape = logical_shape(weight, label)
    return torch.cat(list(row_blocks(weight, label=label, layer=layer))).reshape(shape)


def project_rows(
    weight: Tensor,
    row_factor: Tensor,
    max_elements: int | None = None,
    label: str = "base_weight",
    layer: Any = None,
) -> tuple[Tensor, Tensor]:
    """``(||W||^2, R^T W)`` for the stored weight ``W`` seen as ``(rows, cols)`` and ``R (rows, r)``,
    read block by block (:func:`row_blocks`, ``max_elements`` by default :func:`block_elements`
    of ``R``'s device): a 0-dim tensor and an ``(r, cols)`` one, accumulated in ``R``'s dtype.
    Only one block of ``W`` is floating point at once; a weight with no rows (an empty shard)
    gives zeros."""
    if max_elements is None:
        max_elements = block_elements(row_factor.device)
    dtype = row_factor.dtype
    shape = logical_shape(weight, label)
    cols = math.prod(shape[1:])
    sq_norm = torch.zeros((), dtype=dtype, device=row_factor.device)
    projected = torch.zeros((row_factor.shape[-1], cols), dtype=dtype, device=row_factor.device)
    start = 0
    for block in row_blocks(weight, max_elements, label, layer):
        block = block.to(row_factor.device, dtype)
        count = block.shape[0]
        sq_norm += torch.linalg.vector_norm(block).square()
        projected.addmm_(row_factor[start : start + count].T, block)  # (r, rows_k) @ (rows_k, cols)
        start += count
    if start != row_factor.shape[0]:
        raise ValueError(f"{label}: the weight has {start} rows but the factor {row_factor.shape[0]}")
    return sq_norm, projected
