"""LoFT-Adafactor and LoFT-Muon never allocate an (m, n) tensor on their fast paths, and
LoFT-AdamW's full-space blocks stay within the transient budget of the factors they serve.

A dispatch mode records the shape of every tensor an optimizer step creates (outputs that share
no storage with an input: views and in-place results are not allocations). The pair has a base
weight, so LoFT-Adafactor's relative step reads ``W0`` as it does in real use: a block of rows at
a time (copied to float64), here two rows, so that no block is ``(m, n)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lowrank_opt as lo
from lowrank_opt import quantized

M, N, R = 64, 48, 4


class AllocationRecorder(TorchDispatchMode):
    """Collects ``(op, shape)`` of every newly allocated tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((str(func), tuple(t.shape)))
        return out

    def largest(self) -> int:
        return max(torch.Size(shape).numel() for _, shape in self.allocations)


def _pair() -> lo.LoRAPair:
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(R, N, generator=gen) / N**0.5)
    b = torch.nn.Parameter(torch.randn(M, R, generator=gen) / R**0.5)
    return lo.LoRAPair(a, b, 2.0, torch.randn(M, N, generator=gen))


def _record_steps(pair: lo.LoRAPair, opt: lo.LowRankWrapper, steps: int = 4) -> AllocationRecorder:
    gen = torch.Generator().manual_seed(1)
    recorder = AllocationRecorder()
    for _ in range(steps):
        pair.a.grad = torch.randn(pair.a.shape, generator=gen)
        pair.b.grad = torch.randn(pair.b.shape, generator=gen)
        with recorder:
            opt.step()
    return recorder


CASES = {
    "adafactor": (lambda p: torch.optim.Adafactor(p, weight_decay=0.1), {}),
    "muon": (lambda p: torch.optim.Muon(p), {}),
    "muon-float32": (lambda p: torch.optim.Muon(p), {"ns_dtype": "float32"}),
}


@pytest.mark.parametrize("schedule", ["alternate", "both"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_full_size_tensor_on_the_fast_path(case, schedule, monkeypatch):
    monkeypatch.setattr(quantized, "BLOCK_ELEMENTS", 2 * N)
    make, options = CASES[case]
    pair = _pair()
    opt = lo.LowRankWrapper(make([pair.a, pair.b]), [pair], rule_options=options, schedule=schedule)
    recorder = _record_steps(pair, opt)
    full = [entry for entry in recorder.allocations if entry[1][-2:] in ((M, N), (N, M))]
    assert not full, full
    # Nothing close to (m, n) either: the largest transients are (k, r), (r, l) and (r, r).
    assert recorder.largest() <= max(M, N) * R


def test_the_recorder_sees_full_size_tensors_when_there_are_some():
    """With the clamp active everywhere and one block of all columns, LoFT-Adafactor's blocked
    evaluation forms (k, l) transients; the recorder must report them."""
    pair = _pair()
    base = torch.optim.Adafactor([pair.a, pair.b], eps=(10.0, 1e-3))
    opt = lo.LowRankWrapper(base, [pair], rule_options={"block_elements": M * N})
    recorder = _record_steps(pair, opt)
    assert any(shape[-2:] in ((M, N), (N, M)) for _, shape in recorder.allocations)


@pytest.mark.parametrize("second_moment", ["exact", "diagonal"])
def test_full_space_blocks_stay_within_the_transient_budget(second_moment):
    """LoFT-AdamW's full-space evaluation runs in column blocks of at most
    ``transient_elements`` of the factors it serves: for a 512 x 512 pair at r = 4 that is the
    CPU floor, 2^16 elements, a quarter of ``m n``; the calibration's unpacked blocks too."""
    m = n = 512
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(R, n, generator=gen) / n**0.5)
    b = torch.nn.Parameter(torch.randn(m, R, generator=gen) / R**0.5)
    pair = lo.LoRAPair(a, b, 2.0)
    opt = lo.LowRankWrapper(
        torch.optim.AdamW([a, b], lr=1e-3), [pair], rule_options={"second_moment": second_moment}, schedule="both"
    )
    budget = lo.linalg.transient_elements(R * (m + n), torch.device("cpu"))
    assert budget == 2**16 < m * n
    recorder = _record_steps(pair, opt)
    assert recorder.largest() <= budget, sorted(recorder.allocations, key=lambda e: -torch.Size(e[1]).numel())[:3]
