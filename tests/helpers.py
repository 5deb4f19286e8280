"""Shared builders for the tests: small pairs, dense references and trajectories."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

import lowrank_opt as lo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def compare_module() -> ModuleType:
    """``examples/compare.py`` as the module ``compare``, loaded once for every test file (its
    dataclasses resolve annotations through ``sys.modules``; it puts ``examples/`` on the path)."""
    if "compare" not in sys.modules:
        spec = importlib.util.spec_from_file_location("compare", EXAMPLES / "compare.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["compare"] = module
        spec.loader.exec_module(module)
    return sys.modules["compare"]


def make_pair(
    m: int, n: int, r: int, scale: float = 1.0, dtype: torch.dtype = torch.float64, seed: int = 0, zero_b: bool = False
) -> lo.LoRAPair:
    """A pair with well-conditioned random factors (``b`` zero if asked) and no base weight."""
    gen = torch.Generator().manual_seed(seed)
    a = nn.Parameter(torch.randn(r, n, generator=gen, dtype=dtype) / n**0.5)
    b = nn.Parameter(
        torch.zeros(m, r, dtype=dtype) if zero_b else torch.randn(m, r, generator=gen, dtype=dtype) / r**0.5
    )
    return lo.LoRAPair(a, b, scale, name=f"pair{m}x{n}r{r}")


def quadratic_loss(target: Tensor) -> Callable[[Tensor], Tensor]:
    """``0.5 ||W - target||^2`` plus a cubic term, so gradients are not a fixed linear map of ``W``."""
    return lambda w: 0.5 * (w - target).pow(2).sum() + 0.1 * (w**3).sum() / w.numel()


def full_weight(pair: lo.LoRAPair) -> Tensor:
    w = pair.scale * pair.b @ pair.a
    return w if pair.base_weight is None else pair.base_weight + w


def lowrank_trajectory(pair: lo.LoRAPair, loss_fn, opt: torch.optim.Optimizer, steps: int) -> list[Tensor]:
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(full_weight(pair)).backward()
        opt.step()
        out.append(full_weight(pair).detach().clone())
    return out


def dense_trajectory(w0: Tensor, loss_fn, make_opt, steps: int, max_norm: float | None = None) -> list[Tensor]:
    w = nn.Parameter(w0.clone())
    opt = make_opt([w])
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([w], max_norm)
        opt.step()
        out.append(w.detach().clone())
    return out


def max_rel_error(xs: list[Tensor], ys: list[Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(xs, ys))


def step_with_reference(ref, opt: torch.optim.Optimizer, pair: lo.LoRAPair, loss_fn, active: tuple[str, ...]) -> None:
    """One step of a plain reference rule (on the dense gradient) and of the wrapper, same loss."""
    w = ref.weight().requires_grad_(True)
    loss_fn(w).backward()
    ref.step(w.grad, active)
    opt.zero_grad()
    loss_fn(full_weight(pair)).backward()
    opt.step()


def save_tiny_llama(path: Path, **config: int) -> Path:
    """A random one-layer Llama with two heads, seeded, saved with ``save_pretrained`` at ``path``;
    ``config``: the sizes and token ids of ``transformers.LlamaConfig``."""
    import transformers

    torch.manual_seed(0)
    llama = transformers.LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, **config)
    transformers.LlamaForCausalLM(llama).save_pretrained(path)
    return path
