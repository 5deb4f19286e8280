"""Lightning: gradient_clip_val on full-space norms through FullSpaceClipping, bit-identical (float64); resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lowrank_opt as lo

L = pytest.importorskip("lightning")
peft = pytest.importorskip("peft")

from lowrank_opt.integrations.lightning import FullSpaceClipping  # noqa: E402

STEPS, ACCUMULATION, BATCH = 6, 2, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return peft.get_peft_model(body, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], bias="lora_only"))


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    n = STEPS // 2 * ACCUMULATION * BATCH  # two epochs: a checkpoint at the end of the first one resumes exactly
    return TensorDataset(
        torch.randn(n, 6, generator=gen, dtype=torch.float64), 4 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    )


class Module(FullSpaceClipping, L.LightningModule):
    def __init__(self, net: nn.Module, **options) -> None:
        super().__init__()
        self.net = net
        self.options = options

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return lo.build(self.net, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, **self.options)


def fit(module: Module, tmp_path, ckpt_path=None, callbacks=(), **trainer_options) -> L.Trainer:
    options = dict(
        max_steps=STEPS,
        gradient_clip_val=1.0,
        accumulate_grad_batches=ACCUMULATION,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    options.update(trainer_options)
    trainer = L.Trainer(callbacks=list(callbacks), **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n_steps).*")
        trainer.fit(module, DataLoader(dataset(), batch_size=BATCH), ckpt_path=ckpt_path)
    return trainer


def plain_loop(net: nn.Module) -> list[float]:
    opt = lo.build(net, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0)
    batches = 2 * list(DataLoader(dataset(), batch_size=BATCH))
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        for x, y in batches[step * ACCUMULATION : (step + 1) * ACCUMULATION]:
            (nn.functional.mse_loss(net(x), y) / ACCUMULATION).backward()
        opt.step()
        norms.append(opt.last_grad_norm.item())
    return norms


def trainable(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters() if p.requires_grad]


def test_gradient_clip_val_clips_the_full_space_norm_bit_identically(tmp_path):
    net = make_model()
    reference = copy.deepcopy(net)
    module = Module(net)
    trainer = fit(module, tmp_path)
    norms = plain_loop(reference)
    wrapper = trainer.optimizers[0]
    assert wrapper.max_grad_norm == 1.0 and max(norms) > 1.0
    assert wrapper.last_grad_norm.item() == norms[-1]
    for got, expected in zip(trainable(net), trainable(reference)):
        assert torch.equal(got, expected)


def assert_same_state(got: dict, expected: dict) -> None:
    assert got["state"].keys() == expected["state"].keys()
    for key, entry in expected["state"].items():
        for name, value in entry.items():
            assert torch.equal(got["state"][key][name], value), (key, name)


def test_a_checkpoint_restores_the_wrapper_exactly(tmp_path):
    """The restored run starts from the saved weights and optimizer state, bit for bit, and trains on.

    (Stopped by ``max_steps`` at the end of an epoch, Lightning 2.6 counts the epoch as unfinished
    and replays a batch on resume, with any optimizer; the next test resumes bit for bit from an
    epoch stopped by ``max_epochs``.)"""
    first = fit(Module(make_model()), tmp_path / "first", max_steps=STEPS // 2)
    first.save_checkpoint(tmp_path / "first.ckpt")
    saved_state = copy.deepcopy(first.optimizers[0].state_dict())
    saved_weights = trainable(first.lightning_module.net)

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            assert_same_state(trainer.optimizers[0].state_dict(), saved_state)
            for got, expected in zip(trainable(pl_module.net), saved_weights):
                assert torch.equal(got, expected)
            self.checked = True

    probe = Probe()
    resumed = fit(Module(make_model()), tmp_path / "resumed", ckpt_path=str(tmp_path / "first.ckpt"), callbacks=[probe])
    assert probe.checked and resumed.global_step == STEPS


def test_clipping_by_value_and_conflicting_thresholds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value' clips raw factor gradients"):
        fit(Module(make_model()), tmp_path, gradient_clip_algorithm="value", max_steps=1)
    with pytest.raises(ValueError, match="clips at max_grad_norm=0.5 but gradient_clip_val is 1.0"):
        fit(Module(make_model(), max_grad_norm=0.5), tmp_path, max_steps=1)


def test_resume_from_an_epoch_end_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """Stopped by ``max_epochs`` at the end of epoch 1 and resumed for epoch 2, the run repeats an
    uninterrupted two-epoch run bit for bit, clipping included. (Stopped by ``max_steps`` at the same
    point, Lightning counts the epoch as unfinished and replays a batch, with any optimizer.)"""
    straight = make_model()
    fit(Module(straight), tmp_path / "straight", max_steps=-1, max_epochs=2)
    first = fit(Module(make_model()), tmp_path / "first", max_steps=-1, max_epochs=1)
    first.save_checkpoint(tmp_path / "first.ckpt")
    resumed = make_model()
    fit(Module(resumed), tmp_path / "resumed", ckpt_path=str(tmp_path / "first.ckpt"), max_steps=-1, max_epochs=2)
    for p, q in zip(trainable(straight), trainable(resumed)):
        assert torch.equal(p, q)
