"""Pair discovery: explicit pairs, LoRALinear, the HasLoRAPairs protocol, and real peft models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_opt as lo

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_lora_linear_pairs_and_injection():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lo.inject_lora(model, rank=2, alpha=4, target=lambda name, module: module.out_features == 16)
    pairs = lo.find_lora_pairs(model)
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair.full_shape == (16, 8) and pair.rank == 2 and pair.scale == 2.0
    assert pair.base_weight is model[0].base.weight
    assert not model[2].weight.requires_grad  # everything that is not LoRA is frozen
    x = torch.randn(3, 8)
    assert torch.allclose(model[0](x), model[0].base(x))  # b starts at zero


def test_protocol_modules_are_found():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.randn(5, 2))
            self.v = nn.Parameter(torch.randn(2, 3))

        def lora_pairs(self):
            yield lo.LoRAPair(self.v, self.u, 0.5)

    pairs = lo.find_lora_pairs(nn.Sequential(Custom()))
    assert len(pairs) == 1 and pairs[0].name == "0" and pairs[0].full_shape == (5, 3)


def test_peft_on_a_torch_module():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    model.add_module("out", nn.Linear(10, 3))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "out"], use_rslora=True)
    peft_model = peft.get_peft_model(model, config)
    pairs = lo.find_lora_pairs(peft_model)
    assert [p.full_shape for p in pairs] == [(10, 12), (3, 10)]
    for pair in pairs:
        assert math.isclose(pair.scale, 8 / math.sqrt(4))  # rsLoRA scale read from the layer
        assert pair.base_weight is not None and tuple(pair.base_weight.shape) == pair.full_shape
        assert torch.count_nonzero(pair.b) == 0


def test_peft_on_transformers_models_with_both_orientations():
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    pairs = lo.find_lora_pairs(
        peft.get_peft_model(bert, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["query", "value", "dense"]))
    )
    assert len(pairs) == 6 and all(p.scale == 1.0 for p in pairs)
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    pairs = lo.find_lora_pairs(
        peft.get_peft_model(
            gpt2, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        )
    )
    for pair in pairs:  # GPT-2 stores (in, out) weights: the base matrix is read as (m, n)
        assert pair.base_transposed and tuple(pair.base_matrix().shape) == pair.full_shape


def test_only_trainable_adapters_are_pairs():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 6))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"]))
    peft_model.add_adapter("other", peft.LoraConfig(r=3, target_modules=["proj"]))
    assert [p.rank for p in lo.find_lora_pairs(peft_model)] == [2]  # "other" is not active, so frozen


def _pair(m=4, n=3, r=2):
    return nn.Parameter(torch.randn(r, n)), nn.Parameter(torch.randn(m, r))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: lo.LoRAPair(*_pair()[::-1], 1.0, name="layer7"), "layer7: rank mismatch"),
        (
            lambda: lo.LoRAPair(torch.randn(3), torch.randn(4, 2), 1.0, name="vec"),
            "vec: factor a must be a tensor with at least 2 dimensions",
        ),
        (
            lambda: lo.LoRAPair(torch.randn(2, 3, 3), torch.randn(4, 2, 3), 1.0, name="conv"),
            r"conv: rank mismatch, b is \(4, 2, 3\)",
        ),
        (lambda: lo.LoRAPair(*_pair(), float("nan"), name="x"), "x: scale must be a finite non-zero number, got nan"),
        (
            lambda: lo.LoRAPair(*_pair(), 1.0, torch.zeros(3, 4), name="x"),
            r"x: base_weight is \(3, 4\) but b @ a is \(4, 3\)",
        ),
        (lambda: lo.find_lora_pairs(nn.Linear(3, 3)), "no trainable LoRA pair found in Linear"),
        (lambda: lo.find_lora_pairs([]), "no LoRA pair given"),
        (lambda: lo.LoRALinear(nn.Conv1d(2, 2, 1), 2), "LoRALinear wraps nn.Linear, got Conv1d"),
        (lambda: lo.LoRALinear(nn.Linear(2, 2), 0), "rank must be a positive integer, got 0"),
    ],
)
def test_bad_pairs_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_factor_in_two_pairs_is_refused():
    a, b = _pair()
    b2 = nn.Parameter(torch.randn(4, 2))
    with pytest.raises(ValueError, match="a factor of second is already in first"):
        lo.find_lora_pairs([lo.LoRAPair(a, b, 1.0, name="first"), lo.LoRAPair(a, b2, 1.0, name="second")])


def test_dora_is_refused_with_the_module_name():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 6))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"proj \(adapter 'default'\): LoRA variants such as DoRA are not supported"):
        lo.find_lora_pairs(peft_model)
