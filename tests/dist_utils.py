"""Spawning gloo process groups for the distributed tests, and the model they train.

Every rank runs one worker function that batches many checks and returns a picklable result; a
rank that raises fails the test with its traceback. Every process group has a ``timeout``, so a
rank left waiting in a collective fails instead of hanging.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import lowrank_opt as lo

# (in_features, out_features, rank): 9 pairs; out 17 shards unevenly on 2 ranks and r = 1 leaves
# rank 1 an empty shard of ``a``.
LAYERS = [(6, 17, 1), (17, 12, 3), (12, 12, 2), (12, 10, 4), (10, 12, 2), (12, 9, 3), (9, 11, 2), (11, 8, 2), (8, 3, 2)]
GLOBAL_BATCH = 8

# rule name -> (base optimizer over the trainable parameters, whether a non-LoRA bias trains too)
BASES: dict[str, tuple[Callable[[list[Tensor]], torch.optim.Optimizer], bool]] = {
    "loft_adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01), True),
    # torch.optim.Adafactor's own step on a Shard(0) DTensor differs from its unsharded step (~1e-3
    # for a 3-element vector, torch 2.13), so under FSDP2 it would not match: only LoRA factors train.
    "loft_adafactor": (lambda params: torch.optim.Adafactor(params, lr=1e-2), False),
    "loft_muon": (
        lambda params: torch.optim.Muon(params, lr=1e-2, adjust_lr_fn="match_rms_adamw"),
        False,
    ),  # Muon takes 2-D parameters only
    "generic": (lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9), True),
}


def rules() -> list[str]:
    """The rules of :data:`BASES` that are registered in this installation."""
    return [name for name in BASES if name in lo.available_rules()]


class Net(nn.Module):
    """An MLP of :class:`~lowrank_opt.LoRALinear` layers (peft-style init: ``b = 0``)."""

    def __init__(self, train_bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(lo.LoRALinear(nn.Linear(i, o), r, alpha=2 * r) for i, o, r in LAYERS)
        self.layers[-1].base.bias.requires_grad_(train_bias)  # a parameter that is not a LoRA factor

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, LAYERS[0][0], generator=gen), torch.randn(
        GLOBAL_BATCH, LAYERS[-1][1], generator=gen
    )


def local_batch(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    x, y = batch(step)
    size = GLOBAL_BATCH // world
    return x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]


def build(rule: str, mode: str, **options: Any) -> tuple[nn.Module, lo.LowRankWrapper]:
    """``mode``: ``single`` (no wrapping, no communication), ``replicated`` and ``sharded`` (DDP),
    ``fsdp2`` (``fully_shard``)."""
    make_base, train_bias = BASES[rule]
    net: nn.Module = Net(train_bias)
    strategy = None
    if mode in ("replicated", "sharded"):
        net = nn.parallel.DistributedDataParallel(net)
        strategy = lo.distributed.PairSharded() if mode == "sharded" else lo.distributed.Replicated()
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
    elif mode == "single":  # a reference inside a distributed job: no communication
        strategy = lo.distributed.Replicated(local=True)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    base = make_base([p for p in net.parameters() if p.requires_grad])
    return net, lo.LowRankWrapper(base, net, rule=rule, distributed=strategy, **options)


def train(
    net: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1, micro_batches: int = 1
) -> None:
    """Steps on this rank's share of each global batch.

    A single process given ``micro_batches = 2`` accumulates the two halves that two ranks see,
    each loss halved: its gradient is then bit-identical to DDP's average (two addends, and
    halving is exact), so the modes can be held to float32 rounding of the step alone.
    """
    for t in steps:
        opt.zero_grad()
        for k in range(micro_batches):
            x, y = local_batch(t, rank * micro_batches + k, world * micro_batches)
            (nn.functional.mse_loss(net(x), y) / micro_batches).backward()
        opt.step()


def full_params(net: nn.Module) -> dict[str, Tensor]:
    """Every parameter, whole, by name without wrapper prefixes."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in net.named_parameters():
        value = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name.removeprefix("module.")] = value.clone()
    return out


def identical_on_every_rank(params: dict[str, Tensor]) -> bool:
    """Whether every rank holds bit-identical ``params`` (one all-gather of them, flattened)."""
    flat = torch.cat([p.flatten() for p in params.values()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"parameter names differ: {sorted(a.keys() ^ b.keys())}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def count_release_timeouts() -> list[int]:
    """Count, from now on in this process, the times FSDP2 gave up waiting for a collective's
    buffers to be freed (a reference kept by mistake makes every such wait time out)."""
    from lowrank_opt.distributed import fsdp

    timeouts = [0]
    original = fsdp._await_release

    def counted(flags: list[list[bool]]) -> None:
        original(flags)
        timeouts[0] += not all(flags)

    fsdp._await_release = counted  # type: ignore[assignment]
    return timeouts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, timeout_s: float, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        # DDP and FSDP objects left in reference cycles hold the group: free them before it goes
        # (else gloo can abort the process at exit).
        gc.collect()
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; the results, by rank."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(fn, world, _free_port(), out, timeout_s, args), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
