"""QLoRA: bitsandbytes 4-bit and 8-bit base weights, read block by block (``lowrank_opt.quantized``).

bitsandbytes >= 0.48 quantizes on CPU; every test here runs there. Without bitsandbytes the module
is skipped; where it imports but cannot quantize, the module fixture skips with the error it gave.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import save_tiny_llama
from torch import nn

import lowrank_opt as lo
from lowrank_opt import quantized

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

SHAPES = [(24, 96), (8, 160), (7, 34), (32, 64)]  # rows of 1.5, 2.5, 0.53 and 1 quantization blocks
MAX_ELEMENTS = [1, 200, 10**6]
BLOCKSIZE = 64  # bitsandbytes' default 4-bit block


@pytest.fixture(autouse=True, scope="module")
def _quantizes_here():
    """Skip the module where bitsandbytes imports but cannot quantize a tiny weight on this machine."""
    try:
        four = bnb.nn.Params4bit(torch.randn(2, 64), requires_grad=False).to("cpu")
        eight = bnb.nn.Int8Params(torch.randn(2, 64), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert four.dtype == torch.uint8 and four.quant_state is not None, "Params4bit was not quantized"
        assert eight.dtype == torch.int8 and eight.SCB is not None, "Int8Params was not quantized"
    except Exception as exc:  # any failure of the probe is a reason to skip, reported as it came
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on CPU here: {type(exc).__name__}: {exc}")


def four_bit(w: torch.Tensor, quant_type: str = "nf4", nested: bool = False) -> torch.Tensor:
    """``w`` quantized as a bitsandbytes ``Params4bit`` (quantized by the move to CPU)."""
    return bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=nested, blocksize=BLOCKSIZE
    ).to("cpu")


def eight_bit(w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized as a bitsandbytes ``Int8Params`` (quantized by the move to CPU)."""
    return bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")


def flat_reference(w: torch.Tensor, quant_type: str, nested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes, dequantized weight)`` of ``w`` quantized and dequantized flat by bitsandbytes.

    Flat, not 2-D: bitsandbytes 0.50's CPU dequantization kernel misreads 2-D shapes whose rows
    are not whole quantization blocks (24 x 96, 8 x 160), which is why the library dequantizes
    flat blocks; this pins that its blocks are the flat dequantization."""
    packed, state = bnb.functional.quantize_4bit(
        w.reshape(-1), blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=nested
    )
    return packed, bnb.functional.dequantize_4bit(packed, state).reshape(w.shape)


def int8_reference(weight: torch.Tensor) -> torch.Tensor:
    """``W[i] = CB[i] SCB[i] / 127``."""
    return weight.CB.float() * weight.SCB.float()[:, None] / 127


def check_blocks(weight: torch.Tensor, reference: torch.Tensor, aligned_rows: int, exact: bool) -> None:
    """``row_blocks`` and ``project_rows`` at every ``max_elements`` against the dense ``reference``:
    each block is a floating-point ``(rows_k, cols)`` of at most ``max(max_elements, aligned_rows cols)``
    elements, and they lay end to end into the reference."""
    rows, cols = reference.shape
    factor = torch.randn(rows, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(rows * cols))
    for max_elements in MAX_ELEMENTS:
        blocks = list(quantized.row_blocks(weight, max_elements))
        bound = max(max_elements, aligned_rows * cols)
        for block in blocks:
            assert block.is_floating_point() and block.ndim == 2 and block.shape[1] == cols
            assert block.numel() <= bound, (max_elements, tuple(block.shape))
        laid = torch.cat(blocks)
        if exact:
            assert torch.equal(laid, reference), max_elements
        else:
            torch.testing.assert_close(laid, reference, rtol=1e-6, atol=0)
        # In float64 against the blocks laid end to end (the reference itself where exact).
        sq_norm, projected = quantized.project_rows(weight, factor, max_elements)
        dense = laid.double()
        torch.testing.assert_close(sq_norm, dense.square().sum(), rtol=1e-12, atol=0)
        torch.testing.assert_close(projected, factor.T @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested_absmax"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_four_bit_blocks_equal_the_flat_dequantization(shape, quant_type, nested):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0] + shape[1]))
    weight = four_bit(w, quant_type, nested)
    packed, reference = flat_reference(w, quant_type, nested)
    assert torch.equal(weight.data.reshape(-1), packed.reshape(-1))  # the reference is of the same codes
    assert quantized.logical_shape(weight, "w") == shape
    whole = quantized.dequantized(weight)
    assert whole.shape == shape and torch.equal(whole, reference)
    # A block of rows starts on a quantization block: rows come in groups of BLOCKSIZE / gcd(cols, BLOCKSIZE).
    check_blocks(weight, reference, BLOCKSIZE // math.gcd(shape[1], BLOCKSIZE), exact=True)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_eight_bit_blocks_equal_the_row_scaled_codes(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0] * shape[1]))
    weight = eight_bit(w)
    reference = int8_reference(weight)
    assert (reference - w).abs().max() <= w.abs().amax() / 127  # the codes do quantize w
    whole = quantized.dequantized(weight)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole, reference, rtol=1e-6, atol=0)  # CB (SCB / 127): rounding of the division only
    check_blocks(weight, reference, 1, exact=False)


BASES = ["4bit", "8bit", "float", "float_transposed", "conv"]


def _pair_with_base(kind: str) -> tuple[lo.LoRAPair, torch.Tensor]:
    """A pair on a base of ``kind`` and the base as the dense ``(m, n)`` float64 matrix it stands for."""
    gen = torch.Generator().manual_seed(BASES.index(kind))
    m, n, r = 24, 96, 3
    w = torch.randn(m, n, generator=gen)
    a = nn.Parameter(torch.randn(r, n, generator=gen, dtype=torch.float64))
    b = nn.Parameter(torch.randn(m, r, generator=gen, dtype=torch.float64))
    if kind == "4bit":
        base = four_bit(w, "nf4", nested=True)
        dense = quantized.dequantized(base)
    elif kind == "8bit":
        base = eight_bit(w)
        dense = int8_reference(base)
    elif kind == "float":
        base = dense = w.double()
    elif kind == "float_transposed":  # stored as W0^T, like peft's fan_in_fan_out layers
        dense = w.double()
        base = dense.T.contiguous()
        return lo.LoRAPair(a, b, 2.0, base, kind, base_transposed=True), dense
    else:  # a conv kernel (m, c, kh, kw) = (24, 6, 4, 4), a flattened like it
        base = w.double().reshape(m, 6, 4, 4)
        dense = base.reshape(m, n)
        a = nn.Parameter(a.detach().reshape(r, 6, 4, 4))
        b = nn.Parameter(b.detach().reshape(m, r, 1, 1))
    return lo.LoRAPair(a, b, 2.0, base, kind), dense.double()


@pytest.mark.parametrize("block_elements", [1, 200, quantized.BLOCK_ELEMENTS])
@pytest.mark.parametrize("kind", BASES)
def test_base_products_equal_the_dense_products(kind, block_elements):
    pair, dense = _pair_with_base(kind)
    product = pair.matrix_b(pair.b.detach()) @ pair.matrix_a(pair.a.detach())  # b @ a, without the scale
    expected = torch.stack((dense.square().sum(), (dense * product).sum()))
    got = pair.base_products(block_elements)
    assert got.dtype == torch.float64 and got.shape == (2,)
    rtol = 1e-6 if kind == "8bit" else 1e-12  # 8-bit: CB (SCB / 127) against CB SCB / 127
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
    assert pair.full_shape == (24, 96)
    torch.testing.assert_close(pair.base_matrix().double(), dense, rtol=1e-6, atol=0)


class Quantized(nn.Module):
    """``q8(tanh(q4(x)))`` with the layers asked for: 4-bit (compute in float32) and 8-bit bases."""

    def __init__(self, layers: str) -> None:
        super().__init__()
        self.layers = layers
        self.q4 = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32) if "4" in layers else None
        self.q8 = bnb.nn.Linear8bitLt(64, 16, bias=False, has_fp16_weights=False) if "8" in layers else None
        self.head = nn.Linear(64, 16, bias=False) if self.q8 is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.q4(x)) if self.q4 is not None else x
        return self.q8(h) if self.q8 is not None else self.head(h)


def quantized_model(layers: str, seed: int = 0) -> nn.Module:
    """A peft model (LoRA r = 4) over :class:`Quantized`, quantized by ``.to("cpu")``; same seed, same model."""
    torch.manual_seed(seed)
    net = Quantized(layers).to("cpu")
    targets = [name for name in ("q4", "q8") if getattr(net, name) is not None]
    return peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def regression_data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(16, 64, generator=gen) / 8
    xs = [torch.randn(32, 64, generator=gen) for _ in range(steps)]
    return [(x, torch.tanh(x @ teacher.T)) for x in xs]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, name: str, **rule_options) -> lo.LowRankWrapper:
    if name == "adamw":
        base = torch.optim.AdamW(trainable(model), lr=1e-2)
    elif name == "adafactor":
        base = torch.optim.Adafactor(trainable(model), lr=1e-2)
    elif name == "muon":
        base = torch.optim.Muon(trainable(model), lr=1e-2)
    else:
        base = torch.optim.SGD(trainable(model), lr=1e-2, momentum=0.9)  # the generic rule
    return lo.LowRankWrapper(base, model, rule_options=rule_options or None, advice=False)


def train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_peft_pairs_on_quantized_layers_have_their_full_shapes():
    torch.manual_seed(0)
    net = Quantized("48")
    dense = {"q4": net.q4.weight.data.clone(), "q8": net.q8.weight.data.clone()}  # before quantization
    model = peft.get_peft_model(net.to("cpu"), peft.LoraConfig(r=4, target_modules=["q4", "q8"]))
    pairs = {pair.name.split(".")[-1].split(" ")[0]: pair for pair in lo.find_lora_pairs(model)}
    assert set(pairs) == {"q4", "q8"}
    assert pairs["q4"].full_shape == (64, 64) and isinstance(pairs["q4"].base_weight, bnb.nn.Params4bit)
    assert pairs["q8"].full_shape == (16, 64) and isinstance(pairs["q8"].base_weight, bnb.nn.Int8Params)
    # base_matrix() dequantizes on demand: W0 up to the quantization error (NF4: < 0.2 absmax; int8 of the
    # float16 weight: < absmax / 127).
    for name, bound in (("q4", 0.2), ("q8", 1 / 127)):
        w = pairs[name].base_matrix()
        assert w.shape == dense[name].shape and w.dtype == torch.float32
        assert ((w - dense[name]).abs().amax(1) <= bound * dense[name].abs().amax(1)).all()


@pytest.mark.parametrize(
    "layers, optimizer",
    [
        ("4", "adamw"),
        ("4", "adafactor"),
        ("8", "adamw"),
        ("8", "adafactor"),
        ("48", "adamw"),
        ("48", "adafactor"),
    ],
    ids=["4bit-adamw", "4bit-adafactor", "8bit-adamw", "8bit-adafactor", "both-adamw", "both-adafactor"],
)
def test_quantized_bases_train(layers, optimizer):
    model = quantized_model(layers)
    opt = make_optimizer(model, optimizer)
    losses = train(model, opt, regression_data(8))
    assert losses[-1] < losses[0], losses
    for pair in opt.pairs:
        assert torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()
        assert pair.b.abs().sum() > 0  # the factors moved


def test_an_eight_bit_base_is_read_after_a_forward():
    """bitsandbytes' 8-bit layer moves the weight's scales to its ``state`` at the first forward;
    the pair reads them there (through ``base_layer``) and sees the same ``W0``."""
    model = quantized_model("8")
    (pair,) = lo.find_lora_pairs(model)
    before = pair.base_products()
    model(torch.randn(2, 64))
    torch.testing.assert_close(pair.base_products(), before, rtol=0, atol=0)


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of the one-4-bit-layer :func:`quantized_model` whose base is a float32 ``nn.Linear``
    holding the dequantized weight, with the same LoRA factors."""
    net = Quantized("").to("cpu")
    net.head.weight.data.copy_(model.base_model.model.head.weight)
    net.q4 = nn.Linear(64, 64, bias=False)
    net.q4.weight.data.copy_(quantized.dequantized(model.base_model.model.q4.base_layer.weight))
    twin = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q4"]))
    for (name, mine), (other_name, theirs) in zip(
        ((n, p) for n, p in twin.named_parameters() if p.requires_grad),
        ((n, p) for n, p in model.named_parameters() if p.requires_grad),
    ):
        assert name == other_name
        mine.data.copy_(theirs)
    return twin


def test_loft_adafactor_on_a_4bit_base_follows_the_dense_dequantized_base():
    """LoFT-Adafactor reads W0 (through ||W0||^2 and <W0, B A>). On CPU, bitsandbytes' Linear4bit
    computes ``x @ W_deq^T`` with the same dequantized weight (checked below, bit for bit), so the
    twin with a float32 base holding ``W_deq`` sees the same forward and gradients: the factors
    follow step for step. A twin whose base is off by 1e-3 does not, so the comparison sees ``W0``."""
    model = quantized_model("4")
    with torch.no_grad():  # b non-zero from the start, so <W0, B A> counts from step 1
        model.base_model.model.q4.lora_B["default"].weight.normal_(0, 0.05)
    twin, perturbed = dense_twin(model), dense_twin(model)
    with torch.no_grad():
        perturbed.base_model.model.q4.base_layer.weight.add_(1e-3)
    data = regression_data(10)
    assert torch.equal(model(data[0][0]), twin(data[0][0]))  # bnb's forward is x @ W_deq^T
    runs = [(m, make_optimizer(m, "adafactor")) for m in (model, twin, perturbed)]
    for m, opt in runs:
        train(m, opt, data)
    factors = [[p.detach() for p in trainable(m)] for m, _ in runs]

    def rel(xs, ys):
        return max(((x - y).norm() / y.norm()).item() for x, y in zip(xs, ys))

    assert rel(factors[0], factors[1]) < 1e-5
    assert rel(factors[2], factors[1]) > 1e-4


def _boom(*args, **kwargs):
    raise AssertionError("the base weight was dequantized")


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "sgd"])
def test_rules_that_never_read_the_base_never_dequantize(optimizer, monkeypatch):
    """LoFT-AdamW, LoFT-Muon and the generic rule step with every way of dequantizing patched to raise."""
    model = quantized_model("48")
    opt = make_optimizer(model, optimizer)
    for x, y in regression_data(4):
        nn.functional.mse_loss(model(x), y).backward()
        with monkeypatch.context() as patch:  # the forward and backward may dequantize; the step must not
            patch.setattr(bnb.functional, "dequantize_4bit", _boom)
            patch.setattr(bnb.functional, "dequantize_blockwise", _boom)
            patch.setattr(quantized, "row_blocks", _boom)
            patch.setattr("lowrank_opt.pairs.project_rows", _boom)
            patch.setattr("lowrank_opt.pairs.dequantized", _boom)
            opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in trainable(model))


def test_loft_adafactor_dequantizes_at_the_base_norm_refreshes_only(monkeypatch):
    model = quantized_model("4")
    opt = make_optimizer(model, "adafactor", base_norm_every=3)
    real = bnb.functional.dequantize_4bit
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    per_step = []
    for x, y in regression_data(8):
        nn.functional.mse_loss(model(x), y).backward()
        calls.clear()
        with monkeypatch.context() as patch:  # lowrank_opt.quantized imports it from here at each call
            patch.setattr(bnb.functional, "dequantize_4bit", counted)
            opt.step()
        per_step.append(len(calls))
        opt.zero_grad()
    # One pair of 64 x 64: one block per refresh, at steps 1, 4 and 7.
    assert per_step == [1, 0, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("optimizer, options", [("adamw", {}), ("adafactor", {"base_norm_every": 3})])
def test_resume_with_a_4bit_base_is_bit_identical(optimizer, options, tmp_path):
    data = regression_data(10)
    straight = quantized_model("4")
    train(straight, make_optimizer(straight, optimizer, **options), data)

    first = quantized_model("4")
    opt = make_optimizer(first, optimizer, **options)
    train(first, opt, data[:5])  # stops between two base-norm refreshes (steps 4 and 7)
    torch.save({"factors": [p.detach() for p in trainable(first)], "optimizer": opt.state_dict()}, tmp_path / "c.pt")

    resumed = quantized_model("4")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    with torch.no_grad():
        for p, saved in zip(trainable(resumed), ckpt["factors"]):
            p.copy_(saved)
    opt = make_optimizer(resumed, optimizer, **options)
    opt.load_state_dict(ckpt["optimizer"])
    train(resumed, opt, data[5:])
    for p, q in zip(trainable(resumed), trainable(straight)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "nested_absmax"])
def test_the_cpu_inference_packing_is_read_as_the_same_weight(nested):
    """bitsandbytes' CPU inference packing (blocks of 32 rows, absmax in bfloat16, transposed) read
    back block by block: the weight up to the bfloat16 rounding of the absmax, on any CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=nested).to("cpu")
    reference = quantized.dequantized(weight)
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert quantized.logical_shape(weight, "w") == (64, 128)
    blocks = list(quantized.row_blocks(weight, max_elements=1000))
    assert max(block.numel() for block in blocks) <= 1000
    torch.testing.assert_close(torch.cat(blocks), reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())


@pytest.mark.skipif(
    not getattr(bnb.functional, "has_avx512bf16", lambda: False)(),
    reason="bitsandbytes repacks for CPU inference only with AVX512-BF16",
)
def test_an_eval_forward_repacks_a_4bit_base_and_every_rule_still_reads_it():
    """On a CPU with AVX512-BF16, a Linear4bit forward in eval mode without gradients repacks its
    weight for inference. The pair reads the same ``W0`` from the repacked weight (through the
    inverse packing, on a copy), a new wrapper can be built on the model, and both rules train on."""
    data = regression_data(3)
    for optimizer in ("adamw", "adafactor"):
        model = quantized_model("4")
        opt = make_optimizer(model, optimizer)
        train(model, opt, data[:1])
        (pair,) = opt.pairs
        before = pair.base_products()
        model.eval()
        with torch.no_grad():
            model(data[1][0])
        model.train()
        assert getattr(pair.base_weight.quant_state, "packing_format_for_cpu", False)
        # The packing keeps the absmax values in bfloat16: W0 moves by their rounding (2^-8).
        torch.testing.assert_close(pair.base_products(), before, rtol=1e-2, atol=0)
        make_optimizer(model, optimizer)  # construction reads the logical shape of the packed weight
        losses = train(model, opt, data[1:])
        assert all(math.isfinite(loss) for loss in losses)
        assert getattr(pair.base_weight.quant_state, "packing_format_for_cpu", False)  # the layer keeps it


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama saved with ``save_pretrained`` (hidden size 64: whole quantization blocks)."""
    pytest.importorskip("transformers")
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), vocab_size=64, hidden_size=64, intermediate_size=128)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_transformers_4bit_llama_trains_on_cpu(tiny_llama, optimizer, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tiny_llama, quantization_config=config, device_map="cpu"
        )
    except (ImportError, ValueError, RuntimeError) as exc:
        pytest.skip(f"transformers {transformers.__version__} does not load 4-bit on CPU: {exc}")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.train()
    pairs = lo.find_lora_pairs(model)
    assert len(pairs) == 3 and all(isinstance(pair.base_weight, bnb.nn.Params4bit) for pair in pairs)
    opt = make_optimizer(model, optimizer)
    ids = torch.randint(64, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0], losses
