"""Compare optimizers on one task: LoRA, LoFT-style low-rank rules, full fine-tuning.

    python examples/compare.py --config examples/configs/matrix_factorization.yaml
    python examples/compare.py --config examples/configs/play_id.yaml --seeds '[0]'

A config names a task and a list of runs. Each run gives its base optimizer as
``class_path``/``init_args`` (any ``torch.optim.Optimizer``), a mode
(``full``: dense weights; ``lora``: the base optimizer on the LoRA factors;
``lowrank``: the same optimizer wrapped in ``lowrank_opt.LowRankWrapper``
with a rule and its switches), a rank and a learning rate or a list of them.

A list of learning rates is a sweep: each is trained with the first seed and
the one with the best ``select`` metric is kept (on the validation split,
never the test split); every run that sweeps must list the same number, so
every optimizer gets the same tuning budget. The remaining seeds then run at
the chosen rate. ``lr`` may also name an earlier run: the run then trains at
the rate that run's sweep chose, with no tuning of its own (for instance a
low-rank optimizer at full fine-tuning's rate).

Every LoRA-family run is compared with full fine-tuning on the same seed (the
``reference`` run, by default the first ``full`` run): the cosine similarity
and the relative distance ``|dW - dW_full| / |dW_full|`` between the change of
each adapted layer's effective weight (``W0 + s B A``) over the run and the
change of the same dense weight under full fine-tuning, per layer and over all
adapted layers at once. ``paired`` lists (a, b) run pairs whose per-seed
differences get a mean and a 95% t-interval.

Output: a table on stdout and, in ``out``, ``results.csv`` (one row per run
and seed), ``summary.csv`` and ``results.md`` (mean and std over seeds, then
the paired differences), ``sweep.csv``, ``similarity.csv`` (per layer),
``paired.csv``, ``curves.csv`` (per step: train loss, wall-clock seconds and
test metrics at evaluation steps), ``loss.png`` and ``quality.png`` (the test
metric against steps and against wall-clock seconds).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import ConfigError, Task  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "matrix_factorization.yaml"

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


@dataclass
class WrapperOptions:
    """Keyword arguments of ``lowrank_opt.LowRankWrapper`` (``lowrank`` mode only)."""

    rule: str | None = None
    rule_options: dict[str, Any] | None = None
    schedule: Literal["alternate", "both", "sequential"] = "alternate"
    alternate_every: int = 1
    rescale_grad: bool = True
    calibrate_first_moment: bool = True
    calibrate_second_moment: bool = True
    project_update: bool = True
    max_grad_norm: float | None = None
    full_space_clip: bool = True


@dataclass
class Run:
    """One optimizer setting to compare.

    Args:
        name: Label in the table, the CSV and the plot.
        optimizer: Base optimizer, ``class_path`` and ``init_args`` (``lr`` is set per run).
        lr: Learning rate, a list to sweep, or the name of an earlier run whose chosen rate to use.
        mode: ``full`` (dense weights), ``lora`` (plain optimizer on the factors) or ``lowrank`` (wrapped).
        rank: LoRA rank (``lora`` and ``lowrank``).
        alpha: LoRA alpha (None: the rank, so the scale is 1).
        wrapper: ``LowRankWrapper`` options (``lowrank`` only).
    """

    name: str
    optimizer: OptimizerFactory
    lr: float | list[float] | str
    mode: Literal["full", "lora", "lowrank"] = "lowrank"
    rank: int | None = None
    alpha: float | None = None
    wrapper: WrapperOptions = field(default_factory=WrapperOptions)

    def lrs(self, chosen: dict[str, float]) -> list[float]:
        """Learning rates to try, given the rates already chosen for earlier runs."""
        if isinstance(self.lr, str):
            return [chosen[self.lr]]
        return list(self.lr) if isinstance(self.lr, list) else [self.lr]


@dataclass
class Result:
    """One trained (run, lr, seed)."""

    run: str
    seed: int
    lr: float
    rank: int | None
    train_losses: list[float]
    evals: list[tuple[int, dict[str, float]]]  # (step, test metrics)
    val: dict[str, float]
    test: dict[str, float]
    step_ms: float
    opt_ms: float
    state_bytes: int
    times: list[float]  # training wall-clock seconds after each step (evaluations excluded)
    delta: dict[str, torch.Tensor] | None = None  # change of each adapted layer's weight, until compared
    similarity: dict[str, tuple[float, float]] = field(default_factory=dict)  # layer -> (cos, rel dist)

    def train_loss(self, window: int) -> float:
        tail = self.train_losses[-window:]
        return sum(tail) / len(tail)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n")[0], exit_on_error=False)
    parser.add_argument("--config", action="config", help="YAML config (default: configs/matrix_factorization.yaml)")
    parser.add_argument("--task", type=Task, required=True, help="Task, as class_path/init_args")
    parser.add_argument("--runs", type=list[Run], required=True, help="Runs to compare")
    parser.add_argument("--steps", type=int, default=300, help="Training steps per run")
    parser.add_argument(
        "--seeds", type=list[int], default=[0, 1, 2], help="Seeds; the first one also runs the lr sweep"
    )
    parser.add_argument("--select", type=Literal["val_loss", "val_acc"], default="val_loss", help="Sweep criterion")
    parser.add_argument(
        "--reference",
        type=str | None,
        default=None,
        help="Full run whose delta W the LoRA-family runs are compared with (None: the first full run)",
    )
    parser.add_argument(
        "--paired", type=list[tuple[str, str]], default=[], help="Run pairs (a, b): per-seed a - b, mean and 95% CI"
    )
    parser.add_argument(
        "--eval_every", type=int | None, default=None, help="Test metrics every k steps (None: at the end)"
    )
    parser.add_argument("--loss_window", type=int, default=1, help="Final train loss = mean of the last k steps")
    parser.add_argument("--smooth", type=int, default=1, help="Moving-average window of the plotted train loss")
    parser.add_argument("--out", type=str | None, default=None, help="Output folder (default: runs/<config name>)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads")
    parser.add_argument(
        "--progress", type=bool, default=True, help="Report progress on stderr: bars on a terminal, else lines"
    )
    parser.add_argument(
        "--progress_every",
        type=float,
        default=30.0,
        help="Off a terminal: a line per finished run and one every this many seconds within a run",
    )
    return parser


# Progress -------------------------------------------------------------------


class Progress:
    """Progress on stderr: tqdm bars on a terminal; elsewhere (a log file, CI) plain lines.

    Off a terminal a bar redraws itself into the log on every update, so instead there is one
    line per finished job and, within a job, one every ``every`` seconds.
    """

    def __init__(self, jobs: int, enabled: bool, every: float, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bars = enabled and self.stream.isatty()
        self.lines = enabled and not self.bars
        self.every = every
        self.jobs = jobs
        self.done = 0
        self.total = tqdm(total=jobs, desc="runs", disable=not self.bars, file=self.stream)
        self.bar: tqdm | None = None
        self.desc = ""
        self.steps = 0
        self.started = self.last = 0.0

    def start(self, desc: str, steps: int) -> None:
        """A job of ``steps`` steps begins."""
        self.desc, self.steps = desc, steps
        self.started = self.last = time.monotonic()
        if self.bars:
            self.bar = tqdm(total=steps, desc=desc, leave=False, file=self.stream)

    def step(self, step: int, loss: float) -> None:
        """Step ``step`` (0-based) of the current job ended with ``loss``."""
        if self.bar is not None:
            self.bar.update()
            if step % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3g}")
            return
        now = time.monotonic()
        if self.lines and now - self.last >= self.every:
            self.last = now
            self._line(f"{self.desc}: step {step + 1}/{self.steps}, loss {loss:.3g}")

    def end(self, steps: int, loss: float) -> None:
        """The current job ended after ``steps`` steps with final training loss ``loss``."""
        self.done += 1
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.total.update()
        if self.lines:
            elapsed = time.monotonic() - self.started
            self._line(f"[{self.done}/{self.jobs}] {self.desc}: {steps} steps, train loss {loss:.3g}, {elapsed:.1f} s")

    def close(self) -> None:
        self.total.close()

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


# Training -------------------------------------------------------------------


def _state_bytes(state: Any, seen: set[int]) -> int:
    """Bytes of the tensors in an optimizer state dict (shared tensors once)."""
    if isinstance(state, torch.Tensor):
        key = state.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v, seen) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in state)
    return 0


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: matrices flagged ``use_muon=True``, the rest
    ``False``. ``lowrank_opt.MuonWithAdamW`` steps the first with Muon and the second with AdamW;
    every other optimizer ignores the flag (one empty group is left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim == 2], "use_muon": True},
        {"params": [p for p in params if p.ndim != 2], "use_muon": False},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(task: Task, run: Run, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The run's optimizer over the model's trainable parameters."""
    optimizer = run.optimizer(param_groups(model), lr=lr)
    if run.mode != "lowrank":
        return optimizer
    import lowrank_opt as lo

    return lo.LowRankWrapper(optimizer, task.lowrank_target(model), **dataclasses.asdict(run.wrapper))


def prepare(task: Task, run: Run, lr: float, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Seeded model and optimizer; configuration errors become ``ConfigError``."""
    torch.manual_seed(seed)
    try:
        model = task.build_model(seed, None if run.mode == "full" else run.rank, run.alpha)
        return model, make_optimizer(task, run, model, lr)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError, ImportError) as err:
        # Messages of torch and lowrank_opt name the bad value; keep the first line.
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"run {run.name!r}: {message}") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    task: Task, run: Run, lr: float, seed: int, args: Namespace, device: torch.device, progress: Progress
) -> Result:
    """Train one (run, lr, seed) and measure it."""
    model, optimizer = prepare(task, run, lr, seed)
    model.train()
    start = task.adapted_weights(model)
    losses: list[float] = []
    times: list[float] = []
    evals: list[tuple[int, dict[str, float]]] = []
    step_s = opt_s = elapsed = 0.0
    batches = task.batches(seed)
    progress.start(f"{run.name} lr={lr:g} seed={seed}", args.steps)
    for step in range(args.steps):
        batch = next(batches)
        _sync(device)
        t0 = time.perf_counter()
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        if step > 0:  # the first step pays for lazy state allocation
            step_s += t2 - t0
            opt_s += t2 - t1
        elapsed += t2 - t0
        times.append(elapsed)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break  # diverged: the rest would be NaN too
        progress.step(step, losses[-1])
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            evals.append((step + 1, task.evaluate(model, "test", seed)))
    progress.end(len(losses), losses[-1])
    timed = max(len(losses) - 1, 1)
    test = task.evaluate(model, "test", seed)
    evals.append((len(losses), test))
    return Result(
        run=run.name,
        seed=seed,
        lr=lr,
        rank=None if run.mode == "full" else run.rank,
        train_losses=losses,
        evals=evals,
        val=task.evaluate(model, "val", seed),
        test=test,
        step_ms=1e3 * step_s / timed,
        opt_ms=1e3 * opt_s / timed,
        state_bytes=_state_bytes(optimizer.state_dict()["state"], set()),
        times=times,
        delta={name: weight - start[name] for name, weight in task.adapted_weights(model).items()},
    )


def similarity(delta: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per layer and ``"overall"`` (all layers as one vector): the cosine similarity of ``delta``
    and ``reference`` and the relative distance ``|delta - reference| / |reference|``, in float64."""
    if delta.keys() != reference.keys():
        raise ConfigError(f"delta W layers differ from the reference's: {sorted(delta)} vs {sorted(reference)}")
    out: dict[str, tuple[float, float]] = {}
    dot = sq_d = sq_r = sq_diff = 0.0
    for name, d in delta.items():
        d, r = d.double().flatten(), reference[name].double().flatten()
        layer = (float(d @ d), float(r @ r), float(d @ r), float((d - r) @ (d - r)))
        out[name] = _cos_dist(*layer)
        sq_d, sq_r, dot, sq_diff = sq_d + layer[0], sq_r + layer[1], dot + layer[2], sq_diff + layer[3]
    out["overall"] = _cos_dist(sq_d, sq_r, dot, sq_diff)
    return out


def _cos_dist(sq_d: float, sq_r: float, dot: float, sq_diff: float) -> tuple[float, float]:
    """(cosine, relative distance) from squared norms, the inner product and the squared distance."""
    cos = dot / math.sqrt(sq_d * sq_r) if sq_d > 0 and sq_r > 0 else math.nan
    return cos, math.sqrt(sq_diff / sq_r) if sq_r > 0 else math.nan


def _score(result: Result, select: str) -> float:
    """Lower is better; a diverged run scores +inf."""
    if select == "val_acc":
        value = -result.val.get("acc", math.nan)
    else:
        value = result.val["loss"]
    diverged = not all(math.isfinite(x) for x in result.train_losses[-1:])
    return math.inf if diverged or not math.isfinite(value) else value


def compare(args: Namespace) -> tuple[list[Result], list[dict[str, Any]]]:
    """Sweep learning rates on the first seed, then run every seed at the chosen rate."""
    task: Task = args.task
    runs: list[Run] = args.runs
    device = resolve_device(args.device)
    task.setup(device)
    # Fail on any bad run before spending time on good ones.
    for run in runs:
        prepare(task, run, 1e-3, args.seeds[0])
    if args.select == "val_acc" and "acc" not in task.metrics:
        raise ConfigError(f"select val_acc needs a task with accuracy; {type(task).__name__} has {task.metrics}")
    jobs = sum((1 if isinstance(run.lr, str) else len(run.lrs({}))) + len(args.seeds) - 1 for run in runs)
    results: list[Result] = []
    sweep: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    reference = args.reference or next((run.name for run in runs if run.mode == "full"), None)
    deltas: dict[int, dict[str, torch.Tensor]] = {}  # the reference run's delta W, by seed
    progress = Progress(jobs, args.progress, args.progress_every)
    try:
        for run in runs:
            tried = []
            for lr in run.lrs(chosen):
                tried.append(train(task, run, lr, args.seeds[0], args, device, progress))
            best = min(tried, key=lambda r: _score(r, args.select))
            chosen[run.name] = best.lr
            for r in tried:
                sweep.append(
                    {
                        "run": run.name,
                        "lr": r.lr,
                        "seed": r.seed,
                        "val_loss": r.val["loss"],
                        "val_acc": r.val.get("acc", ""),
                        "chosen": r is best,
                    }
                )
            done = [best] + [train(task, run, best.lr, seed, args, device, progress) for seed in args.seeds[1:]]
            for result in done:
                if run.name == reference and result.delta is not None:
                    deltas[result.seed] = result.delta
                elif run.mode != "full" and result.delta is not None and result.seed in deltas:
                    result.similarity = similarity(result.delta, deltas[result.seed])
                result.delta = None
            results += done
    finally:
        progress.close()
    return results, sweep


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no GPU")
    return device


# Reporting ------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[Result], metrics: tuple[str, ...], window: int) -> list[dict[str, Any]]:
    """Mean and std over seeds, one row per run, in config order."""
    rows = []
    for name in dict.fromkeys(r.run for r in results):
        group = [r for r in results if r.run == name]
        row: dict[str, Any] = {"run": name, "rank": group[0].rank or "full", "lr": group[0].lr, "seeds": len(group)}
        row["train_loss"], row["train_loss_std"] = _mean_std([r.train_loss(window) for r in group])
        for metric in metrics:
            row[f"test_{metric}"], row[f"test_{metric}_std"] = _mean_std([r.test[metric] for r in group])
        compared = [r.similarity["overall"] for r in group if r.similarity]
        row["dw_cos"], row["dw_cos_std"] = _mean_std([c for c, _ in compared])
        row["dw_dist"], row["dw_dist_std"] = _mean_std([d for _, d in compared])
        row["step_ms"] = statistics.fmean(r.step_ms for r in group)
        row["opt_ms"] = statistics.fmean(r.opt_ms for r in group)
        row["seconds"] = statistics.fmean(r.times[-1] for r in group)
        row["state_bytes"] = group[0].state_bytes
        rows.append(row)
    return rows


#: Two-sided 95% quantiles of Student's t, by degrees of freedom (1 to 30).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (the normal's beyond 30)."""
    return _T975[df - 1] if df <= len(_T975) else 1.960


def paired(results: list[Result], pairs: list[tuple[str, str]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per-seed differences ``a - b`` of each test metric (and delta-W cosine where both have it):
    mean, std and the 95% t-interval of the mean, over the seeds both runs have."""

    def value(result: Result, key: str) -> float:
        if key == "dw_cos":
            return result.similarity["overall"][0] if result.similarity else math.nan
        return result.test[key.removeprefix("test_")]

    rows = []
    by_seed = {(r.run, r.seed): r for r in results}
    for a, b in pairs:
        seeds = [seed for (run, seed) in by_seed if run == a and (b, seed) in by_seed]
        for key in [f"test_{m}" for m in metrics] + ["dw_cos"]:
            diffs = [value(by_seed[(a, seed)], key) - value(by_seed[(b, seed)], key) for seed in seeds]
            if not diffs or not all(math.isfinite(d) for d in diffs):
                continue
            mean, std = _mean_std(diffs)
            half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            rows.append(
                {"a": a, "b": b, "metric": key, "seeds": len(diffs), "mean": mean, "std": std,
                 "ci_low": mean - half, "ci_high": mean + half}
            )  # fmt: skip
    return rows


def paired_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the paired differences."""
    lines = ["| a - b | metric | mean ± std | 95% CI | seeds |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['a']} - {row['b']} | {row['metric']} | {_pm(row['mean'], row['std'], '.3g')} "
            f"| [{row['ci_low']:.3g}, {row['ci_high']:.3g}] | {row['seeds']} |"
        )
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # unreachable


def _pm(mean: float, std: float, fmt: str) -> str:
    return f"{mean:{fmt}} ± {std:{fmt}}"


def table(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """Markdown table of the summary rows."""
    with_dw = any(math.isfinite(row["dw_cos"]) for row in rows)
    head = (
        ["run", "rank", "lr", "train loss"]
        + [f"test {m}" for m in metrics]
        + (["ΔW cos", "ΔW rel dist"] if with_dw else [])
        + ["step ms", "opt ms", "opt state", "seeds"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["run"], str(row["rank"]), f"{row['lr']:.3g}", _pm(row["train_loss"], row["train_loss_std"], ".3g")]
        for m in metrics:
            fmt = ".3f" if m == "acc" else ".3g"
            cells.append(_pm(row[f"test_{m}"], row[f"test_{m}_std"], fmt))
        if with_dw:
            for key in ("dw_cos", "dw_dist"):
                cells.append(_pm(row[key], row[f"{key}_std"], ".3g") if math.isfinite(row[key]) else "-")
        cells += [f"{row['step_ms']:.1f}", f"{row['opt_ms']:.1f}", _bytes(row["state_bytes"]), str(row["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _style(index: int) -> dict[str, Any]:
    """Colour and line style of the ``index``-th run: ten colours, then the same ten dashed."""
    return {"color": f"C{index % 10}", "linestyle": "-" if index < 10 else "--"}


def plot(results: list[Result], metrics: tuple[str, ...], smooth: int, path: Path, title: str) -> None:
    """Train loss against step (mean over seeds, min-max band) and, with accuracy, test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = "acc" in metrics
    fig, axes = plt.subplots(1, 2 if with_acc else 1, figsize=(12 if with_acc else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    for i, name in enumerate(dict.fromkeys(r.run for r in results)):
        group = [r for r in results if r.run == name]
        length = min(len(r.train_losses) for r in group)
        curves = torch.tensor([_moving_average(r.train_losses[:length], smooth) for r in group], dtype=torch.float64)
        steps = range(1, length + 1)
        line = ax.plot(steps, curves.mean(0), label=f"{name} (lr {group[0].lr:.3g})", **_style(i))[0]
        if len(group) > 1:
            ax.fill_between(steps, curves.min(0).values, curves.max(0).values, color=line.get_color(), alpha=0.2)
        if with_acc:
            points = [
                (s, statistics.fmean(r.evals[i][1]["acc"] for r in group)) for i, (s, _) in enumerate(group[0].evals)
            ]
            axes[0, 1].plot(*zip(*points), marker="o", color=line.get_color(), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if with_acc:
        axes[0, 1].set_xlabel("step")
        axes[0, 1].set_ylabel("test accuracy (mean over seeds)")
        axes[0, 1].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality(results: list[Result], metric: str, path: Path, title: str) -> None:
    """Test ``metric`` at each evaluation against steps and against training wall-clock seconds
    (mean over seeds), one line per run: time to quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(dict.fromkeys(r.run for r in results)):
        group = [r for r in results if r.run == name]
        points = min(len(r.evals) for r in group)
        steps = [group[0].evals[i][0] for i in range(points)]
        values = [statistics.fmean(r.evals[i][1][metric] for r in group) for i in range(points)]
        seconds = [statistics.fmean(r.times[s - 1] for r in group) for s in steps]
        axes[0].plot(steps, values, marker="o", markersize=3, label=name, **_style(i))
        axes[1].plot(seconds, values, marker="o", markersize=3, label=name, **_style(i))
    for ax, xlabel in zip(axes, ("step", "training wall-clock seconds (mean over seeds)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {metric} (mean over seeds)")
        ax.grid(True, alpha=0.3)
    axes[0].set_title(title)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: list[Result], sweep: list[dict[str, Any]], args: Namespace, out: Path) -> str:
    """Write every output file; return the table."""
    task: Task = args.task
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for r in results:
        row = {
            "run": r.run,
            "seed": r.seed,
            "rank": r.rank or "full",
            "lr": r.lr,
            "train_loss": r.train_loss(args.loss_window),
        }
        row |= {f"val_{m}": r.val[m] for m in task.metrics} | {f"test_{m}": r.test[m] for m in task.metrics}
        row |= dict(zip(("dw_cos", "dw_dist"), r.similarity.get("overall", ("", ""))))
        row |= {"step_ms": r.step_ms, "opt_ms": r.opt_ms, "state_bytes": r.state_bytes, "steps": len(r.train_losses)}
        row["seconds"] = r.times[-1]
        per_seed.append(row)
    _write_csv(out / "results.csv", per_seed)
    rows = summarise(results, task.metrics, args.loss_window)
    _write_csv(out / "summary.csv", rows)
    _write_csv(out / "sweep.csv", sweep)
    layers = [
        {"run": r.run, "seed": r.seed, "layer": layer, "cos": cos, "rel_dist": dist}
        for r in results
        for layer, (cos, dist) in r.similarity.items()
    ]
    if layers:
        _write_csv(out / "similarity.csv", layers)
    differences = paired(results, args.paired, task.metrics)
    if differences:
        _write_csv(out / "paired.csv", differences)
    curves = [
        {"run": r.run, "seed": r.seed, "step": step, "time_s": seconds, "train_loss": loss}
        | {f"test_{m}": "" for m in task.metrics}
        for r in results
        for step, (loss, seconds) in enumerate(zip(r.train_losses, r.times), start=1)
    ]
    index = {(c["run"], c["seed"], c["step"]): c for c in curves}
    for r in results:
        for step, metrics in r.evals:
            index[(r.run, r.seed, step)] |= {f"test_{m}": metrics[m] for m in task.metrics}
    _write_csv(out / "curves.csv", curves)
    text = table(rows, task.metrics)
    if differences:
        text += "\n\n" + paired_table(differences)
    (out / "results.md").write_text(text + "\n")
    plot(results, task.metrics, args.smooth, out / "loss.png", type(task).__name__)
    plot_quality(results, task.metrics[-1] if "acc" in task.metrics else task.metrics[0], out / "quality.png",
                 type(task).__name__)  # fmt: skip
    return text


# Entry point ----------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """jsonargparse nests its messages over many lines; keep the informative ones on one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Problem with given class_path")]
    return " ".join(lines) or type(err).__name__


def parse(argv: list[str]) -> tuple[Namespace, Path]:
    """Parsed, instantiated arguments and the output folder."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    parser = build_parser()
    cfg = parser.parse_args(argv)
    config_name = Path(str(cfg.config[0])).stem if cfg.get("config") else "compare"
    args = parser.instantiate(cfg)
    if args.steps < 1 or not args.seeds:
        raise ConfigError("steps must be positive and seeds non-empty")
    budgets = {len(run.lr) for run in args.runs if isinstance(run.lr, list)}
    if len(budgets) > 1:
        raise ConfigError(f"every run that sweeps must try the same number of learning rates, got {sorted(budgets)}")
    names: set[str] = set()
    for run in args.runs:
        if isinstance(run.lr, str) and run.lr not in names:
            raise ConfigError(f"run {run.name!r}: lr {run.lr!r} names no earlier run")
        names.add(run.name)
        if run.mode != "full" and (run.rank is None or run.rank < 1):
            raise ConfigError(f"run {run.name!r}: mode {run.mode} needs a positive rank")
        if run.mode != "lowrank" and run.wrapper != WrapperOptions():
            raise ConfigError(f"run {run.name!r}: wrapper options apply to mode lowrank only, not {run.mode}")
    if len({run.name for run in args.runs}) != len(args.runs):
        raise ConfigError("run names must be unique")
    modes = {run.name: run.mode for run in args.runs}
    if args.reference is not None and modes.get(args.reference) != "full":
        raise ConfigError(f"reference {args.reference!r} names no full run")
    for a, b in args.paired:
        if a not in modes or b not in modes:
            raise ConfigError(f"paired ({a!r}, {b!r}) names a run that is not in the config")
    return args, Path(args.out) if args.out else Path("runs") / config_name


def main(argv: list[str] | None = None) -> int:
    try:
        args, out = parse(sys.argv[1:] if argv is None else argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        results, sweep = compare(args)
    except ConfigError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2
    except ArgumentError as err:
        print(f"compare.py: error: {_one_line(err)}", file=sys.stderr)
        return 2
    text = write_outputs(results, sweep, args, out)
    print(text)
    print(f"\nwrote {out}/results.csv, summary.csv, sweep.csv, curves.csv, results.md, loss.png, quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
