"""What FSDP2's bookkeeping costs per LoRA pair, with no communication to speak of.

On one gloo process (world 1) FSDP2 still does all of its own work: it packs every shard,
assembles whole factors and gradients on their owner, builds the working pairs, and sends the
moved rows back. Its collectives only copy. The model has ``layers_per_shape`` LoRA layers of
each of three shapes (64 x 64, 64 x 128, 128 x 64), all at r = 8, trained with LoFT-AdamW under
FSDP2 and under the replicated mode (DDP). The two modes step in turn for ``steps`` rounds, one
torch thread, and the script prints the medians: the difference per pair is FSDP2's bookkeeping.

    python examples/bench_fsdp2_bookkeeping.py
    python examples/bench_fsdp2_bookkeeping.py --layers_per_shape '[8, 32, 64]' --steps 40
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist
from bench_distributed import build, free_port  # examples/ is the script's folder, first on the path
from jsonargparse import CLI

SHAPES = [(64, 64), (64, 128), (128, 64)]
MODES = ("replicated", "fsdp2")


def measure(layers_per_shape: int, steps: int) -> dict[str, float]:
    """Median ms per ``step()`` of each mode of :data:`MODES` on ``layers_per_shape`` layers of each shape."""
    shapes = SHAPES * layers_per_shape
    built = {mode: build(mode, "adamw", shapes) for mode in MODES}
    xs = [torch.randn(4, i) for i, _ in shapes]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(steps + 5):  # the first rounds create the state and warm the caches
        for mode, (net, opt) in built.items():
            opt.zero_grad()
            net(xs).backward()
            start = time.perf_counter()
            opt.step()
            if round_ >= 5:
                times[mode].append(time.perf_counter() - start)
    return {mode: 1e3 * statistics.median(t) for mode, t in times.items()}


def main(layers_per_shape: list[int] = [8, 32], steps: int = 30) -> None:  # noqa: B006 (jsonargparse reads the signature)
    """Print, for each model size, both modes' median step and FSDP2's extra time per pair."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        print(f"{'pairs':>5} {'replicated ms':>13} {'fsdp2 ms':>9} {'fsdp2 extra ms / pair':>21}")
        for count in layers_per_shape:
            ms = measure(count, steps)
            pairs = count * len(SHAPES)
            extra = (ms["fsdp2"] - ms["replicated"]) / pairs
            print(f"{pairs:>5} {ms['replicated']:13.1f} {ms['fsdp2']:9.1f} {extra:21.3f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    CLI(main)
