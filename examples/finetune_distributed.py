"""Distributed LoRA fine-tuning with lowrank_opt: replicated (DDP), pair-sharded, FSDP2 or HSDP.

    torchrun --nproc_per_node 2 examples/finetune_distributed.py --mode sharded
    torchrun --nproc_per_node 2 examples/finetune_distributed.py --mode fsdp2 --checkpoint /tmp/lora_ckpt
    torchrun --nproc_per_node 4 examples/finetune_distributed.py --mode hsdp --checkpoint /tmp/lora_ckpt
    torchrun --nproc_per_node 1 examples/finetune_distributed.py --mode replicated --checkpoint /tmp/lora_ckpt

gloo on CPU, nccl on GPUs (one per process). With ``--checkpoint``, a run resumes from the last
complete checkpoint under that directory and saves every ``--save_every`` steps and at the end
(:mod:`lowrank_opt.distributed.checkpoint`: each save goes to a new directory and a pointer file
is switched atomically, so a run killed while saving resumes from the previous checkpoint). A
checkpoint written in any mode and with any number of processes loads in any other.

The task: a frozen random MLP ("pretrained") is adapted with LoRA to imitate a teacher that
differs from it by a low-rank change in every layer, plus a trainable output bias (a parameter
that is not a LoRA factor). Each rank sees its slice of every global batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lowrank_opt as lo
from lowrank_opt.distributed import checkpoint


def pretrained(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def teacher(width: int, depth: int, rank: int) -> nn.Sequential:
    """The pretrained model plus a rank-``rank`` change of every weight: what LoRA can reach."""
    target = pretrained(width, depth, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in target:
            if isinstance(layer, nn.Linear):
                m, n = layer.weight.shape
                layer.weight += (
                    torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) / (rank * n) ** 0.5
                )
    return target.requires_grad_(False)


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    try:
        # The model and DDP are released when run() returns, before the process group is destroyed.
        run(args, torch.device("cuda" if cuda else "cpu"))
    finally:
        dist.destroy_process_group()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["replicated", "sharded", "fsdp2", "hsdp"], default="sharded")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split across ranks")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="directory of checkpoints (resume and save)")
    parser.add_argument("--save_every", type=int, default=100)
    return parser.parse_args()


def run(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} must be divisible by the number of processes {world}")

    model = pretrained(args.width, args.depth, seed=0)
    target = teacher(args.width, args.depth, args.rank).to(device)
    lo.inject_lora(model, rank=args.rank, alpha=2 * args.rank)
    model[-1].base.bias.requires_grad_(True)
    model.to(device)
    strategy: lo.distributed.DistributedStrategy | None = None
    if args.mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if args.mode == "hsdp" and world % 2:
            raise ValueError(f"--mode hsdp replicates over 2 groups of shards; {world} processes do not split in two")
        shape, names = ((2, world // 2), ("replicate", "shard")) if args.mode == "hsdp" else ((world,), ("shard",))
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
        for layer in model:
            if isinstance(layer, lo.LoRALinear):
                fully_shard(layer, mesh=mesh)
        net: nn.Module = fully_shard(model, mesh=mesh)
    else:
        net = nn.parallel.DistributedDataParallel(model)
        strategy = lo.distributed.PairSharded() if args.mode == "sharded" else lo.distributed.Replicated()
    base = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    opt = lo.LowRankWrapper(base, net, distributed=strategy, max_grad_norm=1.0)

    first = 0
    if args.checkpoint is not None:
        resumed = checkpoint.load_latest(args.checkpoint, net, opt)
        if resumed is not None:
            first = resumed
            if rank == 0:
                print(f"resumed from step {first} in {args.checkpoint}")

    size = args.batch // world
    for step in range(first, first + args.steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, args.width, generator=gen)[rank * size : (rank + 1) * size].to(device)
        loss = nn.functional.mse_loss(net(x), target(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == first + args.steps - 1:
            report = torch.tensor([loss.item(), float(lo.distributed.state_bytes(opt))], device=device)
            reports = [torch.zeros_like(report) for _ in range(world)]
            dist.all_gather(reports, report)
            if rank == 0:
                losses = sum(float(r[0]) for r in reports) / world
                per_rank = ", ".join(f"{int(r[1])}" for r in reports)
                print(f"step {step:5d}  loss {losses:.5f}  optimizer state bytes per rank: {per_rank}")
        done = step + 1
        if args.checkpoint is not None and (done % args.save_every == 0 or done == first + args.steps):
            where = checkpoint.save(args.checkpoint, done, net, opt)
            if rank == 0:
                print(f"saved step {done} to {where}")


if __name__ == "__main__":
    main()
