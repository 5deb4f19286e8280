"""Crash-safe checkpoints (lowrank_opt.distributed.checkpoint) and one-rank state dicts of owner strategies.

* A process killed (SIGKILL) while it writes a checkpoint leaves the previous one loadable, and
  resuming from it continues the uninterrupted run exactly.
* On 2 gloo ranks: the helper between modes; the flow of accelerate's ``save_state`` (every rank
  calls ``state_dict()``, rank 0's is saved, every rank loads it) refused on every rank by
  default, and exact with ``full_state_dict=True``, for the pair-sharded and FSDP2 modes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import BASES, Net, build, full_params, max_diff, spawn, train
from torch import nn

import lowrank_opt as lo
from lowrank_opt.distributed import checkpoint

STEPS = 10

_CRASHING = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import torch.distributed.checkpoint.filesystem as fs
    from dist_utils import build, train
    import lowrank_opt as lo

    root = sys.argv[1]
    net, opt = build("loft_adamw", "single")
    train(net, opt, range(3))
    lo.distributed.checkpoint.save(root, 3, net, opt)
    train(net, opt, range(3, 5))
    writes = fs.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):  # the data is on disk, the metadata is not
        writes(self, plan, planner).wait()
        os.kill(os.getpid(), signal.SIGKILL)

    fs.FileSystemWriter.write_data = write_then_die
    lo.distributed.checkpoint.save(root, 5, net, opt)
    """
)


def test_a_crash_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    net, opt = build("loft_adamw", "single")
    train(net, opt, range(STEPS))
    reference = full_params(net)

    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CRASHING, str(root)], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    assert (root / "step-000000005").is_dir() and not (root / "step-000000005" / ".metadata").exists()
    assert checkpoint.latest(root) == (root / "step-000000003", 3)

    net, opt = build("loft_adamw", "single")
    assert checkpoint.load_latest(root, net, opt) == 3
    train(net, opt, range(3, 5))
    # Saving step 5 again replaces what the crash left; the pointer moves; step 3 is kept (keep=2).
    checkpoint.save(root, 5, net, opt)
    assert checkpoint.latest(root) == (root / "step-000000005", 5)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000000003", "step-000000005"]
    with pytest.raises(ValueError, match="never overwritten"):
        checkpoint.save(root, 5, net, opt)

    net, opt = build("loft_adamw", "single")
    assert checkpoint.load_latest(root, net, opt) == 5
    train(net, opt, range(5, STEPS))
    assert max_diff(full_params(net), reference) == 0
    assert checkpoint.load_latest(tmp_path / "empty", net, opt) is None


def _rank0_state_dict_flow(rank: int, opt: lo.LowRankWrapper, path: Path) -> None:
    """accelerate's save_state / load_state: every rank builds its state dict, rank 0 writes it,
    every rank loads the file."""
    state = opt.state_dict()
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    opt.load_state_dict(torch.load(path, weights_only=False))


def _owner_build(mode: str, full_state_dict: bool, train_bias: bool) -> tuple[nn.Module, lo.LowRankWrapper]:
    """Under FSDP2 only LoRA factors train: a rank-0 state dict cannot carry another rank's
    shards of a non-LoRA parameter's DTensor state (accelerate saves FSDP models its own way)."""
    make_base, _ = BASES["loft_adamw"]
    net: nn.Module = Net(train_bias)
    strategy: lo.distributed.DistributedStrategy
    if mode == "single":
        strategy = lo.distributed.Replicated(local=True)
    elif mode == "sharded":
        net = nn.parallel.DistributedDataParallel(net)
        strategy = lo.distributed.PairSharded(full_state_dict=full_state_dict)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
        strategy = lo.distributed.FSDP2(full_state_dict=full_state_dict)
    return net, lo.LowRankWrapper(
        make_base([p for p in net.parameters() if p.requires_grad]), net, distributed=strategy
    )


def _worker(rank: int, world: int, directory: str) -> dict:
    root = Path(directory)
    out: dict = {}
    net, opt = build("loft_adamw", "single")
    train(net, opt, range(STEPS), micro_batches=world)
    reference = full_params(net)

    # The helper: sharded saves at step 5, FSDP2 resumes from it.
    net, opt = build("loft_adamw", "sharded")
    train(net, opt, range(5), rank, world)
    checkpoint.save(root / "helper", 5, net, opt)
    net, opt = build("loft_adamw", "fsdp2")
    first = checkpoint.load_latest(root / "helper", net, opt)
    train(net, opt, range(first or 0, STEPS), rank, world)
    out["helper sharded->fsdp2"] = max_diff(full_params(net), reference)

    for mode in ("sharded", "fsdp2"):
        if mode == "fsdp2":
            net, opt = _owner_build("single", False, False)
            train(net, opt, range(STEPS), micro_batches=world)
            reference = full_params(net)
        for full in (False, True):
            net, opt = _owner_build(mode, full, mode == "sharded")
            train(net, opt, range(5), rank, world)
            saved = root / f"{mode}-{full}.pt"
            try:
                _rank0_state_dict_flow(rank, opt, saved)
            except ValueError as err:
                out["rank 0 state dict", mode, full] = str(err)
                continue
            net2, opt2 = _owner_build(mode, full, mode == "sharded")
            with torch.no_grad():  # the model as accelerate would restore it
                for p, q in zip(net2.parameters(), net.parameters()):
                    p.copy_(q)
            opt2.load_state_dict(torch.load(saved, weights_only=False))
            train(net2, opt2, range(5, STEPS), rank, world)
            out["rank 0 state dict", mode, full] = max_diff(full_params(net2), reference)
    return out


@pytest.mark.distributed
def test_checkpoint_helper_and_rank0_state_dicts_on_2_ranks(tmp_path):
    results = spawn(_worker, 2, str(tmp_path))
    for rank, result in enumerate(results):
        assert result["helper sharded->fsdp2"] < 1e-6, (rank, result)
        for mode in ("sharded", "fsdp2"):
            refused = result["rank 0 state dict", mode, False]
            assert isinstance(refused, str) and "full_state_dict=True" in refused, (rank, mode, refused)
            assert refused == results[0]["rank 0 state dict", mode, False]  # the same error on both ranks
            assert result["rank 0 state dict", mode, True] < 1e-6, (rank, mode, result)
