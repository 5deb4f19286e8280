"""Optimizer-step cost of the lifted rules against their dense and plain-LoRA counterparts.

Two tables, each timing ``optimizer.step()`` alone (gradients are set directly, no forward or
backward):

* ``pair``: one LoRA pair per size ``m = n`` and rank ``r``: the median step, the peak memory the
  step allocates on top of what exists before it, and the optimizer state;
* ``model``: every pair of a model-shaped set of layers at once (``minilm``: 6 layers of q, k, v,
  o, up, down, 36 pairs at r = 8; ``decoder-0.5b``: 8 layers of a 0.5B decoder's q, k, v, o, up,
  gate, down, 56 pairs at r = 16), each lifted rule against the same base optimizer stepping the
  factors directly (plain LoRA, foreach) and against dense AdamW on the full-size weights. All
  optimizers of a table live in one process and are timed in interleaved rounds
  (``torch.utils.benchmark.Timer``); the medians are compared with the targets.

    python examples/bench_step.py pair                                   # the single-pair table, CPU
    python examples/bench_step.py pair --sizes '[1024]' --ranks '[16]'   # one cell
    python examples/bench_step.py model --case minilm                    # model-shaped, CPU, 2 threads
    python examples/bench_step.py model --case decoder-0.5b --device cuda

On CPU the peak is measured by recording every tensor a step allocates (a dispatch mode, in a
separate untimed step); on CUDA by the allocator's peak counter.
"""

from __future__ import annotations

import statistics
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import CLI
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowrank_opt as lo


@dataclass
class Case:
    """One optimizer on one pair (or on the dense weight)."""

    params: list[Tensor]
    optimizer: torch.optim.Optimizer


def _pair(m: int, n: int, r: int, device: str, dtype: torch.dtype) -> lo.LoRAPair:
    gen = torch.Generator().manual_seed(0)
    a = nn.Parameter((torch.randn(r, n, generator=gen) / n**0.5).to(device, dtype))
    b = nn.Parameter((torch.randn(m, r, generator=gen) / r**0.5).to(device, dtype))
    return lo.LoRAPair(a, b, scale=2.0, base_weight=torch.randn(m, n, generator=gen).to(device, dtype))


def _dense(make: Callable[[list[Tensor]], torch.optim.Optimizer]):
    def build(m: int, n: int, r: int, device: str, dtype: torch.dtype) -> Case:
        w = nn.Parameter(torch.randn(m, n, device=device, dtype=dtype))
        return Case([w], make([w]))

    return build


def _factors(make: Callable[[list[Tensor]], torch.optim.Optimizer]):
    def build(m: int, n: int, r: int, device: str, dtype: torch.dtype) -> Case:
        pair = _pair(m, n, r, device, dtype)
        return Case([pair.a, pair.b], make([pair.a, pair.b]))

    return build


def _lifted(make: Callable[[list[Tensor]], torch.optim.Optimizer], rule: str, **rule_options):
    def build(m: int, n: int, r: int, device: str, dtype: torch.dtype) -> Case:
        pair = _pair(m, n, r, device, dtype)
        opt = lo.LowRankWrapper(make([pair.a, pair.b]), [pair], rule=rule, rule_options=rule_options)
        return Case([pair.a, pair.b], opt)

    return build


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def _adafactor(params):
    return torch.optim.Adafactor(params, lr=3e-3)


def _muon(params):
    return torch.optim.Muon(params, lr=1e-2)


METHODS: dict[str, tuple[str, Callable[..., Case]]] = {
    "adamw-dense": ("", _dense(_adamw)),
    "adamw-lora": ("", _factors(_adamw)),
    "loft-adamw-exact": ("loft_adamw", _lifted(_adamw, "loft_adamw", second_moment="exact")),
    "loft-adamw-factored": ("loft_adamw", _lifted(_adamw, "loft_adamw", second_moment="factored")),
    "loft-adamw-diagonal": ("loft_adamw", _lifted(_adamw, "loft_adamw", second_moment="diagonal")),
    "adafactor-dense": ("", _dense(_adafactor)),
    "adafactor-lora": ("", _factors(_adafactor)),
    "loft-adafactor": ("loft_adafactor", _lifted(_adafactor, "loft_adafactor")),
    "loft-adafactor-norm16": ("loft_adafactor", _lifted(_adafactor, "loft_adafactor", base_norm_every=16)),
    "muon-dense": ("", _dense(_muon)),
    "muon-lora": ("", _factors(_muon)),
    "loft-muon": ("loft_muon", _lifted(_muon, "loft_muon")),
}


class AllocationPeak(TorchDispatchMode):
    """Peak bytes of the storages allocated while active (outputs that are not views of an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in _tensors([args, list((kwargs or {}).values())])}
        for t in _tensors([out]):
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _tensors(values: Any) -> list[Tensor]:
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    return []


def _set_grads(case: Case, gen: torch.Generator) -> None:
    for p in case.params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _state_bytes(case: Case) -> int:
    return sum(
        v.numel() * v.element_size()
        for p in case.params
        for v in case.optimizer.state.get(p, {}).values()
        if isinstance(v, Tensor)
    )


def _measure(case: Case, device: str, warmup: int, repeats: int) -> tuple[float, float, int]:
    """(median step seconds, peak extra bytes of one step, state bytes)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup):
        _set_grads(case, gen)
        case.optimizer.step()
    from torch.utils.benchmark import Timer

    sync = "torch.cuda.synchronize()" if device == "cuda" else "pass"
    timer = Timer("optimizer.step(); " + sync, globals={"optimizer": case.optimizer, "torch": torch})
    seconds = timer.timeit(repeats).median  # the gradients of the last warm-up step, stepped again
    _set_grads(case, gen)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        case.optimizer.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with torch.no_grad(), AllocationPeak() as tracker:
            case.optimizer.step()
        peak = tracker.peak
    return seconds, peak, _state_bytes(case)


def pair(
    sizes: list[int] = [1024, 4096],  # noqa: B006 (jsonargparse reads defaults from the signature)
    ranks: list[int] = [4, 16, 64],  # noqa: B006
    methods: list[str] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
) -> list[dict[str, object]]:
    """Print a markdown table of step time, peak extra memory and state size.

    Args:
        sizes: values of ``m = n``.
        ranks: LoRA ranks ``r``.
        methods: names from METHODS (default: all whose rule is registered).
        repeats: timed steps per cell (the median is reported).
        warmup: untimed steps first (state is created, caches warm).
        device: ``cpu`` or ``cuda``.
        dtype: parameter dtype (``float32`` or ``bfloat16``).
        threads: ``torch.set_num_threads`` value (default: leave torch's choice).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    registered = lo.available_rules()
    chosen = methods or [name for name, (rule, _) in METHODS.items() if not rule or rule in registered]
    unknown = [name for name in chosen if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    torch_dtype = getattr(torch, dtype)
    rows = []
    print(f"device={device} dtype={dtype} threads={torch.get_num_threads()} repeats={repeats} (median)\n")
    print("| method | m = n | r | step ms | x dense | x plain LoRA | peak extra MiB | state MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        for r in ranks:
            dense_ms: dict[str, float] = {}
            lora_ms: dict[str, float] = {}
            for name in chosen:
                family = name.split("-")[0] if not name.startswith("loft-") else name.split("-")[1]
                case = METHODS[name][1](size, size, r, device, torch_dtype)
                seconds, peak, state = _measure(case, device, warmup, repeats)
                ms = seconds * 1e3
                if name.endswith("-dense"):
                    dense_ms[family] = ms
                if name.endswith("-lora"):
                    lora_ms[family] = ms
                ratio = f"{ms / dense_ms[family]:.3f}" if family in dense_ms else "-"
                lora_ratio = f"{ms / lora_ms[family]:.2f}" if family in lora_ms and name.startswith("loft-") else "-"
                row = {
                    "method": name,
                    "size": size,
                    "rank": r,
                    "step_ms": ms,
                    "peak_mib": peak / 2**20,
                    "state_mib": state / 2**20,
                }
                rows.append(row)
                print(
                    f"| {name} | {size} | {r} | {ms:.2f} | {ratio} | {lora_ratio} | {peak / 2**20:.1f} | {state / 2**20:.2f} |",
                    flush=True,
                )
                del case
    return rows


# (out, in) of each adapted layer, per transformer block.
MODEL_LAYERS = {
    "minilm": (6, 8, [(384, 384)] * 4 + [(1536, 384), (384, 1536)]),
    "decoder-0.5b": (8, 16, [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]),
}


def _model_pairs(case: str, device: str, dtype: torch.dtype) -> list[lo.LoRAPair]:
    blocks, r, shapes = MODEL_LAYERS[case]
    return [_pair(m, n, r, device, dtype) for _ in range(blocks) for m, n in shapes]


BASELINES: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "adamw-lora": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
    "adafactor-lora": lambda p: torch.optim.Adafactor(p, lr=3e-3, foreach=True),
    "muon-lora": _muon,
    "sgd-lora": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, foreach=True),
    "adamw-dense": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, foreach=True),
}
# name -> (base optimizer, rule, rule options, baseline, target ratio per case). The lifted methods use the
# baseline's own base optimizer (foreach); "-lora" baselines step the factors directly, "adamw-dense"
# steps the full-size weights.
MODEL_METHODS: dict[
    str, tuple[Callable[[list[Tensor]], torch.optim.Optimizer], str, dict, str, float | dict[str, float]]
] = {
    "loft-adamw-factored": (BASELINES["adamw-lora"], "loft_adamw", {"second_moment": "factored"}, "adamw-lora", 3.0),
    "loft-adafactor-norm16": (
        BASELINES["adafactor-lora"],
        "loft_adafactor",
        {"base_norm_every": 16},
        "adafactor-lora",
        3.0,
    ),
    "loft-muon": (BASELINES["muon-lora"], "loft_muon", {}, "muon-lora", 3.0),
    "generic-sgd-momentum": (BASELINES["sgd-lora"], "generic", {}, "sgd-lora", 3.0),
    "loft-adamw-diagonal": (BASELINES["adamw-lora"], "loft_adamw", {"second_moment": "diagonal"}, "adamw-dense", 1.0),
    "loft-adamw-exact": (
        BASELINES["adamw-lora"],
        "loft_adamw",
        {"second_moment": "exact"},
        "adamw-dense",
        {"minilm": 2.0, "decoder-0.5b": 3.0},
    ),
}


def model(
    case: str = "minilm",
    methods: list[str] | None = None,
    rounds: int = 7,
    steps: int = 3,
    device: str = "cpu",
    threads: int | None = 2,
) -> list[dict[str, object]]:
    """Print a markdown table of step time for a model-shaped set of pairs, with ratios and targets.

    Args:
        case: ``minilm`` or ``decoder-0.5b`` (see :data:`MODEL_LAYERS`).
        methods: names from :data:`MODEL_METHODS` (default: all whose rule is registered).
        rounds: interleaved timing rounds; the median over rounds is reported.
        steps: steps per method per round.
        device: ``cpu`` or ``cuda``.
        threads: ``torch.set_num_threads`` value (``None``: leave torch's choice).
    """
    from torch.utils.benchmark import Timer

    if case not in MODEL_LAYERS:
        raise SystemExit(f"unknown case {case!r}; choose from {list(MODEL_LAYERS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    registered = lo.available_rules()
    chosen = methods or [name for name, spec in MODEL_METHODS.items() if spec[1] in registered]
    unknown = [name for name in chosen if name not in MODEL_METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(MODEL_METHODS)}")
    gen = torch.Generator().manual_seed(1)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    needed = {MODEL_METHODS[name][3] for name in chosen}
    for name in sorted(needed):
        pairs = _model_pairs(case, device, torch.float32)
        if name == "adamw-dense":
            params = [nn.Parameter(torch.randn(p.full_shape, generator=gen).to(device)) for p in pairs]
        else:
            params = [f for p in pairs for f in (p.a, p.b)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        optimizers[name] = BASELINES[name](params)
    for name in chosen:
        make, rule, options, _, _ = MODEL_METHODS[name]
        pairs = _model_pairs(case, device, torch.float32)
        params = [f for p in pairs for f in (p.a, p.b)]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        optimizers[name] = lo.LowRankWrapper(make(params), pairs, rule=rule, rule_options=options)
    for opt in optimizers.values():  # state created, caches warm
        opt.step()
    sync = "torch.cuda.synchronize()" if device == "cuda" else "pass"
    timers = {
        name: Timer("opt.step(); " + sync, globals={"opt": opt, "torch": torch}) for name, opt in optimizers.items()
    }
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.timeit(steps).median)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    blocks, r, shapes = MODEL_LAYERS[case]
    print(
        f"case={case} ({blocks * len(shapes)} pairs, r={r}) device={device} threads={torch.get_num_threads()} "
        f"rounds={rounds} x {steps} steps (median)\n"
    )
    print("| method | step ms | baseline | baseline ms | ratio | target | met |")
    print("|---|---:|---|---:|---:|---:|---|")
    rows = []
    for name in chosen:
        baseline, target = MODEL_METHODS[name][3], MODEL_METHODS[name][4]
        target = target[case] if isinstance(target, dict) else target
        ratio = ms[name] / ms[baseline]
        met = "yes" if ratio <= target else f"no ({ratio / target:.2f}x over)"
        print(
            f"| {name} | {ms[name]:.2f} | {baseline} | {ms[baseline]:.2f} | {ratio:.2f} | {target:g} | {met} |",
            flush=True,
        )
        rows.append({"method": name, "step_ms": ms[name], "baseline": baseline, "ratio": ratio, "target": target})
    return rows


if __name__ == "__main__":
    CLI({"pair": pair, "model": model}, as_positional=False)
