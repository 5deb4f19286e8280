"""FSDP2 stepping bucket by bucket (2 gloo ranks).

With ``bucket_bytes`` smaller than what a rank owns, the step gathers, computes and sends back
one bucket after another (the next one's first exchange in flight): no more than one bucket's
pairs are whole at once, the clip still sees every pair's norm, and the result is a single
process's bit for bit. The factors and the gradients of one side of a group, assembled in one copy
per run, are what assembling them one by one gives.
A transactional step, which must be able to put everything back, runs as one bucket. The
gathered gradients are dropped group by group once lifted, except under the sequential schedule,
which lifts them again mid-step, and a clip on raw factor gradients, which reads them after. A
non-finite gradient on one rank makes both ranks skip (or raise) before any bucket moves, and the
next step runs normally (the gathers in flight were drained).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from dist_utils import BASES as ALL_BASES
from dist_utils import Net, count_release_timeouts, full_params, local_batch, max_diff, spawn, train
from lowrank_opt_plugins.loft_adamw import LoFTAdamW
from torch import nn
from torch.distributed.tensor import DTensor

import lowrank_opt as lo
from lowrank_opt import CalibrationRule, wrapper
from lowrank_opt.distributed import fsdp

pytestmark = pytest.mark.distributed

STEPS = 5
BASES = {rule: ALL_BASES[rule] for rule in ("loft_adamw", "loft_adafactor")}  # (base optimizer, bias trains)


class ReadsBase(LoFTAdamW):
    """LoFT-AdamW that reads ``W0`` whole, as a rule of one's own may: FSDP2 must gather it."""

    reads_base_weight = True

    def update(self, state, g_hat, view, ctx):  # type: ignore[no-untyped-def]
        for pair, w in zip(view.pairs, view.base_matrices()):  # whole W0, in canonical orientation
            m, n = pair.full_shape
            assert w is not None and not isinstance(w, DTensor)
            assert tuple(w.shape) == ((m, n) if view.side == "a" else (n, m)), (pair.name, w.shape)
        return super().update(state, g_hat, view, ctx)


def _build(
    rule: str, mode: str, clip: float | None = 0.05, rule_object: CalibrationRule | None = None, **options: Any
) -> tuple[nn.Module, lo.LowRankWrapper]:
    make_base, train_bias = BASES[rule]
    net: nn.Module = Net(train_bias)
    strategy: lo.distributed.DistributedStrategy = lo.distributed.Replicated(local=True)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net.layers:
            fully_shard(layer)
        fully_shard(net)
        strategy = lo.distributed.FSDP2(bucket_bytes=300)
    base = make_base([p for p in net.parameters() if p.requires_grad])
    return net, lo.LowRankWrapper(
        base, net, rule=rule_object or rule, distributed=strategy, max_grad_norm=clip, **options
    )


class Repeated(nn.Module):
    """LoRA layers of repeated shapes: on 2 ranks the factors of rank 2 split evenly, so an owner
    of two same-shape pairs assembles their factors in one copy per run; those of rank 3 do not."""

    WIDTHS = [(6, 8, 2), (8, 8, 2), (8, 8, 2), (8, 8, 2), (8, 8, 3), (8, 8, 3), (8, 3, 2)]  # (in, out, r)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(lo.LoRALinear(nn.Linear(i, o), r, alpha=2 * r) for i, o, r in self.WIDTHS)
        for layer in self.layers:
            layer.base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def _repeated() -> tuple[nn.Module, lo.LowRankWrapper]:
    from torch.distributed.fsdp import fully_shard

    net = Repeated()
    for layer in net.layers:
        fully_shard(layer)
    fully_shard(net)
    base = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return net, lo.LowRankWrapper(base, net, rule="loft_adamw", distributed=lo.distributed.FSDP2())


def _runs(rank: int, world: int) -> tuple[float, list[tuple[int, bool]]]:
    """FSDP2 on :class:`Repeated` with the tensors assembled one by one, then by runs: the
    difference, and every run this rank assembled in one copy (its length, and whether it was of
    factors rather than gradients). (Against a single
    process the groups differ, three same-shape pairs in one against two and one, and batched
    kernels need not round alike for different batch sizes.)"""
    one_by_one = fsdp.FSDP2._run_end
    fsdp.FSDP2._run_end = lambda self, call, start, into, runs: start + 1  # type: ignore[method-assign]
    try:
        net, opt = _repeated()
        train(net, opt, range(STEPS), rank, world)
    finally:
        fsdp.FSDP2._run_end = one_by_one  # type: ignore[method-assign]
    reference = full_params(net)
    runs: list[tuple[int, bool]] = []
    in_one_copy = fsdp.FSDP2._assembled_run

    def counted(self, call, start, end, into):  # type: ignore[no-untyped-def]
        runs.append((end - start, call.tensors[start] in into))
        return in_one_copy(self, call, start, end, into)

    fsdp.FSDP2._assembled_run = counted  # type: ignore[method-assign]
    try:
        net, opt = _repeated()
        train(net, opt, range(STEPS), rank, world)
    finally:
        fsdp.FSDP2._assembled_run = in_one_copy  # type: ignore[method-assign]
    return max_diff(full_params(net), reference), runs


def _recording() -> list[tuple[list[int] | None, list[int]]]:
    """Record, for every working set FSDP2 opens, the pairs it covers and those it holds whole."""
    seen: list[tuple[list[int] | None, list[int]]] = []
    original = fsdp.FSDP2._working_set

    def working_set(self, pairs, state, whole, indices):  # type: ignore[no-untyped-def]
        seen.append((None if indices is None else list(indices), [i for i, p in enumerate(pairs) if p.a in whole]))
        return original(self, pairs, state, whole, indices)

    fsdp.FSDP2._working_set = working_set  # type: ignore[method-assign]
    return seen


def _recording_gradients() -> list[bool]:
    """Record, at every ``run_step``, whether the working factors it steps still hold gradients."""
    held: list[bool] = []
    original = wrapper.run_step

    def run_step(groups, *args, **kwargs):  # type: ignore[no-untyped-def]
        if groups:  # a bucket may hold none of this rank's pairs
            held.append(any(p.grad is not None for group in groups for side in "ab" for p in group.params(side)))
        return original(groups, *args, **kwargs)

    wrapper.run_step = run_step  # type: ignore[assignment]
    return held


def _worker(rank: int, world: int) -> dict:
    seen = _recording()
    held = _recording_gradients()
    timeouts = count_release_timeouts()
    out: dict[str, Any] = {}
    for rule, clip in ((rule, clip) for rule in BASES for clip in (None, 0.05)):
        net, opt = _build(rule, "single", clip)
        train(net, opt, range(STEPS), micro_batches=world)
        reference = full_params(net)
        for transactional in (None, True):
            net, opt = _build(rule, "fsdp2", clip, transactional=transactional)
            strategy = opt.distributed
            assert isinstance(strategy, lo.distributed.FSDP2)
            seen.clear()
            held.clear()
            train(net, opt, range(STEPS), rank, world)
            owned = sorted(i for i in range(len(opt.pairs)) if strategy.owns(i))
            out[rule, clip, transactional] = {
                "diff": max_diff(full_params(net), reference),
                "gradients held": any(held),
                "transactional": opt.transactional,
                "seen": list(seen),
                "owned": owned,
                "buckets": strategy.buckets(opt.pairs, list(range(len(opt.pairs))), False),
            }
    # The sequential schedule lifts gradients again mid-step: the gathered ones must stay.
    net, opt = _build("loft_adamw", "single", None, schedule="sequential")
    train(net, opt, range(STEPS), micro_batches=world)
    reference = full_params(net)
    net, opt = _build("loft_adamw", "fsdp2", None, schedule="sequential")
    held.clear()
    train(net, opt, range(STEPS), rank, world)
    out["sequential"] = max_diff(full_params(net), reference), all(held)
    # A clip on the raw factor gradients reads them after the lift: they must stay too.
    net, opt = _build("loft_adamw", "single", 0.05, full_space_clip=False)
    train(net, opt, range(STEPS), micro_batches=world)
    reference = full_params(net)
    net, opt = _build("loft_adamw", "fsdp2", 0.05, full_space_clip=False)
    held.clear()
    train(net, opt, range(STEPS), rank, world)
    out["raw clip"] = max_diff(full_params(net), reference), all(held)
    # A rule that reads W0 whole: the bases travel with the gradients, or alone from ALONE_BYTES on.
    net, opt = _build("loft_adamw", "single", None, rule_object=ReadsBase())
    train(net, opt, range(STEPS), micro_batches=world)
    reference = full_params(net)
    fsdp.ALONE_BYTES, default = 500, fsdp.ALONE_BYTES
    try:
        net, opt = _build("loft_adamw", "fsdp2", None, rule_object=ReadsBase())
        train(net, opt, range(STEPS), rank, world)
    finally:
        fsdp.ALONE_BYTES = default
    out["reads base"] = max_diff(full_params(net), reference)
    out["runs"] = _runs(rank, world)
    out["release timeouts"] = timeouts[0]
    out["others only"] = _others_only(rank, world)
    out["nonfinite"] = _nonfinite(rank, world)
    return out


def _others_only(rank: int, world: int) -> tuple[bool, bool]:
    """A step where no LoRA factor has a gradient: no bucket of pairs, the bias still moves."""
    net, opt = _build("loft_adamw", "fsdp2")
    train(net, opt, range(1), rank, world)
    before = full_params(net)
    opt.zero_grad()
    x, y = local_batch(1, rank, world)
    nn.functional.mse_loss(net(x), y).backward()
    for pair in opt.pairs:
        pair.a.grad = pair.b.grad = None
    opt.step()
    after = full_params(net)
    trained = {name.removeprefix("module.") for name, p in net.named_parameters() if p.requires_grad}
    others_moved = all(not torch.equal(after[k], before[k]) for k in trained if "lora" not in k)
    factors_kept = all(torch.equal(after[k], before[k]) for k in trained if "lora" in k)
    return others_moved, factors_kept


def _nonfinite(rank: int, world: int) -> dict[str, Any]:
    """A NaN in rank 1's shard of one gradient, after two steps: every rank skips, then raises."""
    result: dict[str, Any] = {}
    for policy in ("skip", "raise"):
        net, opt = _build("loft_adamw", "fsdp2", nonfinite=policy)
        train(net, opt, range(2), rank, world)
        before = full_params(net)
        opt.zero_grad()
        x, y = local_batch(2, rank, world)
        nn.functional.mse_loss(net(x), y).backward()
        if rank == 1:
            opt.pairs[3].b.grad.to_local().view(-1)[0] = float("nan")  # type: ignore[union-attr]
        try:
            opt.step()
            result[policy] = f"stepped, skipped {opt.skipped_steps}"
        except ValueError as error:
            result[policy] = f"raised: {'non-finite gradient' in str(error)}"
        result[policy, "unchanged"] = max_diff(full_params(net), before) == 0
        train(net, opt, range(3, 4), rank, world)  # the next step runs: no collective was left open
        result[policy, "moved after"] = max_diff(full_params(net), before) > 0
    return result


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return spawn(_worker, 2, timeout_s=120.0)


def test_fsdp2_steps_bucket_by_bucket_and_equals_a_single_process(results):
    for result in results:
        for rule, clip in ((rule, clip) for rule in BASES for clip in (None, 0.05)):
            bucketed, whole = result[rule, clip, None], result[rule, clip, True]
            # Bit for bit without clipping. The clip sums float64 squares in another order (per
            # bucket, then over ranks), and LoFT-AdamW amplifies a last-bit difference of the clip
            # coefficient over steps.
            tolerance = 0.0 if clip is None else 1e-5
            assert bucketed["diff"] <= tolerance, (rule, clip, bucketed["diff"])
            assert whole["diff"] <= tolerance, (rule, clip, whole["diff"])
            # The gathered gradients go group by group once lifted: none is left when the rules run.
            assert not bucketed["gradients held"] and not whole["gradients held"]
            assert bucketed["transactional"] is False and whole["transactional"] is True
            buckets = bucketed["buckets"]
            assert len(buckets) > 1, buckets
            assert sorted(i for bucket in buckets for i in bucket) == list(range(len(Net(True).layers)))
            # Bucket by bucket: each working set holds this rank's pairs of one bucket, whole; with
            # the clip every bucket is opened twice per step (the norms' pass, then the step's).
            assert len(bucketed["seen"]) == (1 if clip is None else 2) * len(buckets) * STEPS
            for indices, held in bucketed["seen"]:
                assert indices in buckets
                assert held == [i for i in indices if i in bucketed["owned"]]
            # Transactional: one working set per step, every owned pair whole at once.
            assert len(whole["seen"]) == STEPS
            assert all(held == whole["owned"] for _, held in whole["seen"])


def test_a_groups_factors_and_gradients_are_assembled_in_one_copy_as_one_by_one(results):
    for result in results:
        diff, _ = result["runs"]
        assert diff == 0, diff
    # The owner of two of the three (8, 8) pairs of rank 2 assembles each side's two factors, and
    # their two gradients, at once.
    runs = [run for result in results for run in result["runs"][1]]
    assert any(length >= 2 and factors for length, factors in runs), runs
    assert any(length >= 2 and not factors for length, factors in runs), runs


def test_a_rule_that_reads_the_base_weight_gets_it_whole_and_equals_a_single_process(results):
    for result in results:
        assert result["reads base"] == 0, result["reads base"]


def test_every_buffer_is_freed_before_the_next_is_allocated(results):
    for result in results:
        assert result["release timeouts"] == 0


def test_the_sequential_schedule_steps_bucket_by_bucket_too(results):
    for result in results:
        assert result["sequential"] == (0, True), result["sequential"]


def test_a_clip_on_raw_factor_gradients_keeps_them_and_equals_a_single_process(results):
    for result in results:
        diff, held = result["raw clip"]
        assert held
        assert diff <= 1e-5, diff


def test_a_step_without_factor_gradients_moves_the_other_parameters(results):
    for result in results:
        assert result["others only"] == (True, True)


def test_a_nan_on_one_rank_skips_or_raises_every_bucketed_rank_together(results):
    for result in results:
        outcome = result["nonfinite"]
        assert outcome["skip"] == "stepped, skipped 1"
        assert outcome["raise"] == "raised: True"
        for policy in ("skip", "raise"):
            assert outcome[policy, "unchanged"], policy
            assert outcome[policy, "moved after"], policy
