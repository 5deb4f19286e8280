"""examples/compare.py progress: bars only on a terminal, otherwise a bounded number of plain lines."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from helpers import compare_module

compare = compare_module()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drive(progress, jobs: int, steps: int) -> None:
    for job in range(jobs):
        progress.start(f"job{job}", steps)
        for step in range(steps):
            progress.step(step, 1.0 / (step + 1))
        progress.end(steps, 1.0 / steps)
    progress.close()


def test_off_a_terminal_one_line_per_job() -> None:
    stream = io.StringIO()
    _drive(compare.Progress(3, True, every=3600.0, stream=stream), jobs=3, steps=500)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"[{i + 1}/3] job{i}: 500 steps, train loss 0.002, ") and line.endswith(" s")
    assert "\r" not in stream.getvalue()


def test_off_a_terminal_a_line_every_interval_within_a_job() -> None:
    stream = io.StringIO()
    _drive(compare.Progress(1, True, every=0.0, stream=stream), jobs=1, steps=4)
    lines = stream.getvalue().splitlines()
    assert lines[:4] == [f"job0: step {s}/4, loss {1 / s:.3g}" for s in range(1, 5)]
    assert lines[4].startswith("[1/1] job0: 4 steps")


def test_on_a_terminal_bars_and_no_lines() -> None:
    stream = Terminal()
    _drive(compare.Progress(2, True, every=0.0, stream=stream), jobs=2, steps=20)
    text = stream.getvalue()
    assert "\r" in text and "runs" in text
    assert "[1/2]" not in text and "step 1/20" not in text


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()])
def test_disabled_writes_nothing(stream: io.StringIO) -> None:
    _drive(compare.Progress(2, False, every=0.0, stream=stream), jobs=2, steps=20)
    assert stream.getvalue() == ""


def test_a_logged_run_writes_a_line_per_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adamw = "{class_path: torch.optim.AdamW, init_args: {eps: 1.0e-4, weight_decay: 0.0}}"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
task: {{class_path: tasks.MatrixFactorization, init_args: {{d_in: 24, d_out: 16, target_rank: 2}}}}
steps: 200
seeds: [0, 1]
runs:
  - {{name: lora, mode: lora, rank: 2, optimizer: {adamw}, lr: [0.01, 0.1]}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {adamw}, lr: lora}}
"""
    )
    assert compare.main(["--config", str(config), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5  # lora: two rates and one more seed; loft: the borrowed rate and one more seed
    assert err[0].startswith("[1/5] lora lr=0.01 seed=0: 200 steps, train loss ")
