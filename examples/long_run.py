"""Long float32 runs of every rule, with and without factor balancing: do the factors stay balanced
and their Grams well-conditioned over thousands of steps?

    python examples/long_run.py                                   # 5,000 steps, every rule
    python examples/long_run.py --steps 500 --rules '[loft_adamw]'

The problem is a small classifier: a frozen random MLP (32 -> 64 -> 64 -> 10, tanh) with LoRA on
its three linear layers (rank 4, peft's start: ``B = 0``, ``A`` random), trained with the
cross-entropy loss on labels from a teacher (the same MLP with a random low-rank change of every
layer, so the adapters can reach it), in minibatches of 32 drawn from 2,048 fixed inputs. Every
run starts from the same model and sees the same minibatches.

Every ``log_every`` steps each pair's ``||A|| / ||B||`` (Frobenius norms) and the condition numbers
of its two Grams, ``cond(B^T B)`` and ``cond(A A^T)``, are recorded (the largest over pairs;
``inf`` while a Gram is singular, as at ``B = 0``). Output: a table on stdout (per rule and
balancing: the largest ``||A|| / ||B||`` and Gram condition numbers from the first logged step on,
and the final loss on all 2,048 inputs) and ``long_run.csv`` in ``out`` (one row per logged step).
Progress lines go to stderr when it is a terminal.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from torch import Tensor, nn

import lowrank_opt as lo

DIMS = (32, 64, 64, 10)
SAMPLES, BATCH = 2048, 32


@dataclass(frozen=True)
class RuleRun:
    """One rule with the base optimizer it lifts."""

    label: str
    rule: str
    make: Callable[[Iterable[Tensor]], torch.optim.Optimizer]
    options: dict[str, Any]


RULES = {
    "loft_adamw": RuleRun("loft_adamw", "loft_adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), {}),
    "loft_adamw_factored": RuleRun(
        "loft_adamw_factored",
        "loft_adamw",
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
        {"second_moment": "factored"},
    ),
    "loft_adamw_diagonal": RuleRun(
        "loft_adamw_diagonal",
        "loft_adamw",
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
        {"second_moment": "diagonal"},
    ),
    "loft_adafactor": RuleRun(
        "loft_adafactor", "loft_adafactor", lambda p: torch.optim.Adafactor(p, lr=1e-3, weight_decay=0.01), {}
    ),
    "loft_muon": RuleRun("loft_muon", "loft_muon", lambda p: torch.optim.Muon(p, lr=2e-2, weight_decay=0.01), {}),
    "generic_sgd": RuleRun(
        "generic_sgd", "generic", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), {}
    ),
}


@dataclass
class Record:
    """What one logged step shows."""

    rule: str
    balance: bool
    step: int
    loss: float
    ratio: float  # max over pairs of ||A|| / ||B||
    cond_b: float  # max over pairs of cond(B^T B)
    cond_a: float  # max over pairs of cond(A A^T)


def _mlp(gen: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(DIMS, DIMS[1:])):
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) / fan_in**0.5)
            linear.bias.copy_(0.1 * torch.randn(fan_out, generator=gen))
        layers.append(linear)
        if i < len(DIMS) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_data(seed: int) -> tuple[Tensor, Tensor]:
    """Inputs and the teacher's labels: the base MLP with a random rank-2 change of every layer."""
    gen = torch.Generator().manual_seed(seed + 1)
    teacher = _mlp(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in teacher:
            if isinstance(layer, nn.Linear):
                out, inp = layer.weight.shape
                change = torch.randn(out, 2, generator=gen) @ torch.randn(2, inp, generator=gen)
                layer.weight.add_(change / inp**0.5)
        inputs = torch.randn(SAMPLES, DIMS[0], generator=gen)
        labels = teacher(inputs).argmax(dim=1)
    return inputs, labels


def make_model(seed: int, rank: int) -> nn.Module:
    """The frozen base MLP with LoRA on every linear layer (``B = 0``, ``A`` drawn from ``seed``)."""
    model = _mlp(torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 2)
    return lo.inject_lora(model, rank=rank, alpha=2 * rank)


def _gram_cond(f: Tensor) -> float:
    sigma = torch.linalg.svdvals(f.double())
    return math.inf if sigma[-1] == 0 else (sigma[0] / sigma[-1]).item() ** 2


def measure(pairs: list[lo.LoRAPair]) -> tuple[float, float, float]:
    """The largest ``||A|| / ||B||``, ``cond(B^T B)`` and ``cond(A A^T)`` over ``pairs``."""
    with torch.no_grad():
        ratio = max((p.a.norm() / p.b.norm()).item() if p.b.norm() > 0 else math.inf for p in pairs)
        cond_b = max(_gram_cond(p.b) for p in pairs)
        cond_a = max(_gram_cond(p.a) for p in pairs)
    return ratio, cond_b, cond_a


def train(
    run: RuleRun, balance: bool, data: tuple[Tensor, Tensor], steps: int, rank: int, log_every: int, seed: int
) -> list[Record]:
    """One run: ``steps`` minibatch steps, a :class:`Record` every ``log_every`` steps and at the end."""
    inputs, labels = data
    model = make_model(seed, rank)
    pairs = lo.find_lora_pairs(model)
    base = run.make([p for p in model.parameters() if p.requires_grad])
    opt = lo.LowRankWrapper(base, model, rule=run.rule, rule_options=run.options, balance=balance)
    order = torch.Generator().manual_seed(seed + 3)
    loss_fn = nn.CrossEntropyLoss()
    records = []
    progress = sys.stderr.isatty()
    started = time.monotonic()
    for step in range(1, steps + 1):
        batch = torch.randint(SAMPLES, (BATCH,), generator=order)
        opt.zero_grad()
        loss_fn(model(inputs[batch]), labels[batch]).backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                loss = loss_fn(model(inputs), labels).item()
            records.append(Record(run.label, balance, step, loss, *measure(pairs)))
            if progress:
                print(
                    f"{run.label} balance={balance} step {step}/{steps} loss {loss:.4f} "
                    f"({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                )
    return records


def summary(records: list[Record]) -> list[dict[str, Any]]:
    """Per rule and balancing: the largest ratio and condition numbers, and the final loss."""
    rows: dict[tuple[str, bool], dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(
            (rec.rule, rec.balance),
            {"rule": rec.rule, "balance": rec.balance, "ratio": 0.0, "cond_b": 0.0, "cond_a": 0.0, "loss": 0.0},
        )
        row["ratio"] = max(row["ratio"], rec.ratio)
        row["cond_b"] = max(row["cond_b"], rec.cond_b)
        row["cond_a"] = max(row["cond_a"], rec.cond_a)
        row["loss"] = rec.loss
    return list(rows.values())


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rule | balance | max ‖A‖/‖B‖ | max cond(BᵀB) | max cond(AAᵀ) | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['rule']} | {'on' if row['balance'] else 'off'} | {row['ratio']:.3g} | {row['cond_b']:.3g} "
            f"| {row['cond_a']:.3g} | {row['loss']:.4f} |"
        )
    return "\n".join(lines)


def main(
    steps: int = 5000,
    rules: list[str] = list(RULES),  # noqa: B006 (jsonargparse reads defaults from the signature)
    rank: int = 4,
    log_every: int = 50,
    seed: int = 0,
    threads: int = 1,
    out: Path = Path("runs/long_run"),
) -> None:
    """Run every rule in ``rules`` for ``steps`` float32 steps with and without balancing.

    Args:
        steps: optimizer steps per run.
        rules: which of ``loft_adamw``, ``loft_adamw_factored``, ``loft_adamw_diagonal``,
            ``loft_adafactor``, ``loft_muon``, ``generic_sgd`` (SGD with Nesterov momentum) to run.
        rank: the LoRA rank of every layer.
        log_every: steps between two recorded rows.
        seed: the base model, the teacher, the inputs and the minibatch order.
        threads: torch CPU threads.
        out: folder for ``long_run.csv``.
    """
    unknown = [name for name in rules if name not in RULES]
    if unknown:
        raise ValueError(f"unknown rules {unknown}; choose from {list(RULES)}")
    torch.set_num_threads(threads)
    data = make_data(seed)
    records = [
        rec
        for name in rules
        for balance in (True, False)
        for rec in train(RULES[name], balance, data, steps, rank, log_every, seed)
    ]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "long_run.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Record.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(vars(rec) for rec in records)
    print(format_table(summary(records)))
    print(f"\nwrote {out / 'long_run.csv'}")


if __name__ == "__main__":
    CLI(main)
