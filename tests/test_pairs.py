"""Pair discovery: explicit pairs, LoRALinear, the HasLoRAPairs protocol, and real peft models."""

from __future__ import annotations

import copy
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


def _named(name: str, layer: nn.Module) -> nn.Module:
    model = nn.Sequential()
    model.add_module(name, layer)
    return model.double()


def _peft(layer: nn.Module, r: int, **config) -> tuple[nn.Module, nn.Module]:
    """A peft model around one layer (random B, so the pair is not trivially zero) and its LoRA layer."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _named("layer", layer),
        peft.LoraConfig(r=r, lora_alpha=3, target_modules=["layer"], init_lora_weights=False, **config),
    )
    return model, model.get_submodule("base_model.model.layer")


def _delta(pair: lo.LoRAPair, like: torch.Tensor) -> torch.Tensor:
    """``s B A`` laid out like the base weight ``like``."""
    delta = pair.scale * pair.matrix_b(pair.b) @ pair.matrix_a(pair.a)
    return delta.T if pair.base_transposed else delta.reshape(like.shape)


LAYERS = {
    "linear": lambda: nn.Linear(5, 4),
    "embedding": lambda: nn.Embedding(7, 4),
    "conv1d": lambda: nn.Conv1d(3, 4, 2),
    "conv2d": lambda: nn.Conv2d(2, 5, 3),
    "conv3d": lambda: nn.Conv3d(2, 3, 2),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_every_peft_layer_pair_reproduces_the_delta_weight(kind, variant):
    model, layer = _peft(LAYERS[kind](), r=2, **variant)
    (pair,) = lo.find_lora_pairs(model)
    base = layer.get_base_layer().weight
    assert torch.allclose(_delta(pair, base), layer.get_delta_weight("default"), rtol=1e-12, atol=1e-14)
    assert pair.base_weight is base and torch.equal(
        pair.base_matrix(), base.reshape(pair.full_shape[0], -1) if not pair.base_transposed else base.T
    )
    assert math.isclose(pair.scale, 3 / math.sqrt(2) if variant.get("use_rslora") else 1.5)


def test_embedding_orientation_against_the_forward():
    """Through peft's forward: the embedding's output moves by ``(s B A)^T`` rows."""
    model, layer = _peft(nn.Embedding(7, 4), r=3)
    (pair,) = lo.find_lora_pairs(model)
    ids = torch.tensor([0, 3, 6, 3])
    expected = torch.nn.functional.embedding(ids, pair.base_matrix().T + (pair.scale * pair.b @ pair.a).T)
    assert torch.allclose(model(ids), expected)


def test_several_adapters_and_the_magnitude_of_dora_trains_as_an_ordinary_parameter():
    model, layer = _peft(nn.Linear(5, 4), r=2, use_dora=True)
    model.add_adapter("second", peft.LoraConfig(r=3, target_modules=["layer"]))
    model.base_model.set_adapter(["default", "second"])  # both trainable
    pairs = lo.find_lora_pairs(model)
    assert sorted(p.rank for p in pairs) == [2, 3]
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert magnitude.requires_grad and all(magnitude is not f for p in pairs for f in (p.a, p.b))


def test_the_pair_follows_the_base_across_model_to():
    model, layer = _peft(nn.Linear(5, 4), r=2)
    (pair,) = lo.find_lora_pairs(model)
    model.to(torch.float32)
    assert pair.base_matrix().dtype == torch.float32 and pair.a.dtype == torch.float32


def test_unsupported_layers_are_named_or_left_to_the_base_optimizer():
    model = nn.Sequential()
    model.add_module("grouped", nn.Conv2d(4, 4, 3, groups=2))
    model.add_module("flat", nn.Flatten())
    model.add_module("proj", nn.Linear(4, 4))
    model = peft.get_peft_model(model.double(), peft.LoraConfig(r=2, target_modules=["grouped", "proj"]))
    with pytest.raises(ValueError, match=r"grouped \(adapter 'default'\): a grouped convolution \(groups=2\)"):
        lo.find_lora_pairs(model)
    with pytest.raises(ValueError, match="unsupported must be 'error' or 'base', got 'skip'"):
        lo.find_lora_pairs(model, unsupported="skip")
    with pytest.warns(UserWarning, match=r"trained by the base optimizer as ordinary parameters: .*grouped"):
        pairs = lo.find_lora_pairs(model, unsupported="base")
    assert [p.name.split(".")[-1] for p in pairs] == ["proj (adapter 'default')"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = lo.LowRankWrapper(torch.optim.AdamW(trainable, lr=1e-2), pairs)
    grouped = model.get_submodule("base_model.model.grouped").lora_A["default"].weight
    before = grouped.detach().clone()
    model(torch.randn(2, 4, 3, 3, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(grouped, before)  # stepped by AdamW itself


def _full_rank_trajectory(model: nn.Module, forward, steps: int, lr: float = 1e-2) -> nn.Module:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = lo.LowRankWrapper(torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0), model)
    for _ in range(steps):
        opt.zero_grad()
        forward(model).backward()
        opt.step()
    return model


def _dense_trajectory(params: list[torch.Tensor], forward, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        forward().backward()
        opt.step()


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y - 0.3).pow(2).mean() + 0.1 * y.pow(3).mean()


@pytest.mark.parametrize(
    ("layer", "inputs"),
    [
        pytest.param(lambda: nn.Embedding(5, 5), lambda: torch.tensor([[0, 1, 2], [3, 4, 1]]), id="embedding"),
        pytest.param(lambda: nn.Conv2d(1, 4, 2), lambda: torch.randn(3, 1, 4, 4, dtype=torch.float64), id="conv2d"),
    ],
)
def test_full_rank_equivalence_with_dense_adamw(layer, inputs):
    """At full rank (``r = m = n``) LoFT-AdamW through peft equals AdamW on the dense layer."""
    model, lora_layer = _peft(layer(), r=4 if "Conv" in type(layer()).__name__ else 5)
    x = inputs()
    base = lora_layer.get_base_layer()
    dense = copy.deepcopy(base)
    with torch.no_grad():
        dense.weight.add_(lora_layer.get_delta_weight("default"))
    dense.weight.requires_grad_(True)
    _full_rank_trajectory(model, lambda m: _loss(m(x)), steps=20)
    _dense_trajectory([dense.weight], lambda: _loss(dense(x)), steps=20)
    merged = base.weight + lora_layer.get_delta_weight("default")
    assert ((merged - dense.weight).norm() / dense.weight.norm()).item() < 1e-9


def test_dora_full_rank_equivalence_with_a_dense_dora_layer():
    """DoRA at full rank: the direction ``W0 + s B A`` moves as AdamW moves a dense direction ``V``,
    and the magnitude as AdamW moves it, with peft's detached column norm."""
    model, lora_layer = _peft(nn.Linear(5, 5, bias=False), r=5, use_dora=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    base = lora_layer.get_base_layer()
    direction = nn.Parameter((base.weight + lora_layer.get_delta_weight("default")).detach().clone())
    magnitude = nn.Parameter(lora_layer.lora_magnitude_vector["default"].weight.detach().clone())

    def dense_forward() -> torch.Tensor:
        return _loss(nn.functional.linear(x, direction) * (magnitude / direction.norm(dim=1).detach()))

    assert torch.allclose(model(x), nn.functional.linear(x, direction) * (magnitude / direction.norm(dim=1)))
    _full_rank_trajectory(model, lambda m: _loss(m(x)), steps=20)
    _dense_trajectory([direction, magnitude], dense_forward, steps=20)
    merged = base.weight + lora_layer.get_delta_weight("default")
    assert ((merged - direction).norm() / direction.norm()).item() < 1e-9
    final_magnitude = lora_layer.lora_magnitude_vector["default"].weight
    assert ((final_magnitude - magnitude).norm() / magnitude.norm()).item() < 1e-9


def test_peft_layer_types_that_are_not_lifted_are_named():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match=r"attn \(adapter 'default'\): MultiheadAttention layers are not supported"):
        lo.find_lora_pairs(model)
