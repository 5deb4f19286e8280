"""LowRankTrainer: transformers' Trainer with full-space clipping, bit-identical (float64) to a plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank_opt as lo

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from lowrank_opt.integrations.transformers import LowRankTrainer  # noqa: E402


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.body(x), labels)}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body.0", "body.2"], bias="lora_only")
    return peft.get_peft_model(Regressor().double(), config)


def make_data(n: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = 4 * torch.randn(n, 3, generator=gen, dtype=torch.float64)  # large targets: clipping at 1.0 binds
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class Recorder:
    """A collator that keeps every batch it makes, in the order the Trainer consumes them."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, items):
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        self.batches.append(batch)
        return batch


def arguments(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def plain_loop(model, args, batches, accumulation: int = 1):
    """The same training written by hand: the Trainer's optimizer, max_grad_norm in the wrapper."""
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
    base = cls([p for p in model.parameters() if p.requires_grad], weight_decay=args.weight_decay, **kwargs)
    opt = lo.LowRankWrapper(base, model, max_grad_norm=1.0)
    norms = []
    for step in range(args.max_steps):
        opt.zero_grad()
        for batch in batches[step * accumulation : (step + 1) * accumulation]:
            (model(**batch)["loss"] / accumulation).backward()
        opt.step()
        norms.append(opt.last_grad_norm.item())
    return norms


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_with_default_clipping_is_bit_identical_to_a_plain_loop(tmp_path, accumulation):
    model = make_model()
    reference = copy.deepcopy(model)
    recorder = Recorder()
    args = arguments(tmp_path, per_device_train_batch_size=4 // accumulation, gradient_accumulation_steps=accumulation)
    assert args.max_grad_norm == 1.0  # the Trainer's default
    trainer = LowRankTrainer(model=model, args=args, train_dataset=make_data(), data_collator=recorder)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, lo.LowRankWrapper)
    norms = plain_loop(reference, args, recorder.batches, accumulation)
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert logged == norms and max(norms) > 1.0  # the full-space norm, and clipping bound
    for got, expected in zip(trainable(model), trainable(reference)):
        assert torch.equal(got, expected)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    args = arguments(tmp_path, save_strategy="steps", save_steps=3)
    whole = make_model()
    LowRankTrainer(model=whole, args=args, train_dataset=make_data(), data_collator=Recorder()).train()
    resumed = make_model()
    trainer = LowRankTrainer(model=resumed, args=args, train_dataset=make_data(), data_collator=Recorder())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for got, expected in zip(trainable(resumed), trainable(whole)):
        assert torch.equal(got, expected)


def test_optimizer_cls_and_kwargs_and_lowrank_options(tmp_path):
    model = make_model()
    trainer = LowRankTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, max_grad_norm=0.0),
        train_dataset=make_data(),
        data_collator=Recorder(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
        lowrank_options={"schedule": "both"},
    )
    trainer.train()
    wrapper = trainer.optimizer.optimizer
    assert isinstance(wrapper.base, torch.optim.SGD) and wrapper.rule.name == "generic"
    assert wrapper.max_grad_norm is None  # max_grad_norm=0: no clipping, the norm still measured and logged
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged) == 2 and logged[-1] == wrapper.last_grad_norm.item()


def test_conflicting_thresholds_are_refused(tmp_path):
    model = make_model()
    opt = lo.LowRankWrapper(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), model, max_grad_norm=0.5
    )
    trainer = LowRankTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=make_data(),
        optimizers=(opt, None),
        data_collator=Recorder(),
    )
    with pytest.raises(ValueError, match=r"clips at max_grad_norm=0.5 but TrainingArguments.max_grad_norm is 1.0"):
        trainer.train()
    with pytest.raises(ValueError, match="set the clipping threshold with TrainingArguments.max_grad_norm"):
        LowRankTrainer(model=model, args=arguments(tmp_path), lowrank_options={"max_grad_norm": 1.0})
