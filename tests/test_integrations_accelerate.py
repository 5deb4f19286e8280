"""accelerate: a prepared wrapper and accelerator.clip_grad_norm_ on full-space norms, bit-identical (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_opt as lo

accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

from lowrank_opt.integrations.accelerate import full_space_clipping  # noqa: E402

STEPS, ACCUMULATION = 6, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return peft.get_peft_model(body, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], bias="lora_only"))


def batches(n: int = STEPS * ACCUMULATION) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(3, 6, generator=gen, dtype=torch.float64),
            4 * torch.randn(3, 3, generator=gen, dtype=torch.float64),
        )
        for _ in range(n)
    ]


def make_optimizer(model: nn.Module, **options) -> lo.LowRankWrapper:
    return lo.build(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, **options)


def loss_of(model, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def plain_loop(model, opt, clip: float | None = None) -> list[float]:
    norms = []
    data = batches()
    for step in range(STEPS):
        opt.zero_grad()
        for batch in data[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            (loss_of(model, batch) / ACCUMULATION).backward()
        if clip is not None:
            opt.clip_grad_norm_(clip)
        opt.step()
        norms.append(opt.last_grad_norm.item())
    return norms


def accelerate_loop(model, opt, clip: float | None = None, start: int = 0, stop: int = STEPS, accelerator=None):
    accelerator = accelerator or accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model, opt = accelerator.prepare(model, opt)
    if clip is not None:
        full_space_clipping(accelerator, opt)
    norms = []
    for batch in batches()[start * ACCUMULATION : stop * ACCUMULATION]:
        with accelerator.accumulate(model):
            accelerator.backward(loss_of(model, batch))
            if accelerator.sync_gradients and clip is not None:
                norms.append(accelerator.clip_grad_norm_(model.parameters(), clip).item())
            opt.step()
            opt.zero_grad()
    return norms, accelerator, opt


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def assert_identical(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(params(a), params(b)):
        assert torch.equal(x, y)


def test_a_prepared_wrapper_clips_inside_step_bit_identically():
    model = make_model()
    reference = copy.deepcopy(model)
    accelerate_loop(model, make_optimizer(model, max_grad_norm=1.0))
    norms = plain_loop(reference, make_optimizer(reference, max_grad_norm=1.0))
    assert max(norms) > 1.0
    assert_identical(model, reference)


def test_accelerator_clip_grad_norm_clips_the_full_space_norm():
    model, reference, in_step = make_model(), make_model(), make_model()
    norms, _, _ = accelerate_loop(model, make_optimizer(model), clip=1.0)
    expected = plain_loop(reference, make_optimizer(reference), clip=1.0)
    assert norms == expected and max(norms) > 1.0  # the returned norm is the full-space one
    assert_identical(model, reference)
    # Clipping before step() or inside it is the same mathematics, up to rounding.
    plain_loop(in_step, make_optimizer(in_step, max_grad_norm=1.0))
    for x, y in zip(params(model), params(in_step)):
        assert (x - y).norm() <= 1e-12 * y.norm()


def test_with_max_grad_norm_in_the_wrapper_the_call_only_measures():
    model, reference = make_model(), make_model()
    norms, accelerator, opt = accelerate_loop(model, make_optimizer(model, max_grad_norm=1.0), clip=1.0)
    assert norms == plain_loop(reference, make_optimizer(reference, max_grad_norm=1.0))
    assert_identical(model, reference)  # clipped once, in step()
    with pytest.raises(ValueError, match=r"clipping at 0.5 was asked, but the wrapper clips at max_grad_norm=1.0"):
        loss_of(model, batches()[0]).backward()
        accelerator.clip_grad_norm_(model.parameters(), 0.5)


def test_other_calls_keep_accelerate_behaviour_and_partial_sets_are_refused():
    model = make_model()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, make_optimizer(model))
    full_space_clipping(accelerator, opt)
    loss_of(model, batches()[0]).backward()
    other = nn.Parameter(torch.ones(3, dtype=torch.float64))
    other.grad = torch.full((3,), 4.0, dtype=torch.float64)
    assert accelerator.clip_grad_norm_([other], 1.0).item() == pytest.approx(48**0.5)
    assert torch.allclose(other.grad.norm(), torch.tensor(1.0, dtype=torch.float64))
    wrapper = opt.optimizer
    with pytest.raises(ValueError, match="pass them all"):
        accelerator.clip_grad_norm_([wrapper.pairs[0].a], 1.0)
    with pytest.raises(ValueError, match="expected a LowRankWrapper"):
        full_space_clipping(accelerator, torch.optim.SGD([other], lr=0.1))


def test_save_state_and_load_state_resume_bit_identically(tmp_path):
    whole = make_model()
    accelerate_loop(whole, make_optimizer(whole), clip=1.0)
    first = make_model()
    _, accelerator, _ = accelerate_loop(first, make_optimizer(first), clip=1.0, stop=3)
    accelerator.save_state(str(tmp_path))
    resumed = make_model()
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model, opt = accelerator.prepare(resumed, make_optimizer(resumed))
    accelerator.load_state(str(tmp_path))
    accelerate_loop(model, opt, clip=1.0, start=3, accelerator=accelerator)
    assert_identical(resumed, whole)
