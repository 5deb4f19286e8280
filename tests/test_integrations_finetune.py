"""examples/finetune.py on a tiny randomly initialised Llama saved to a temporary directory (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("jsonargparse")
pytest.importorskip("tqdm")
tokenizers = pytest.importorskip("tokenizers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
_spec = importlib.util.spec_from_file_location("finetune", EXAMPLES / "finetune.py")
finetune = importlib.util.module_from_spec(_spec)
sys.modules["finetune"] = finetune
_spec.loader.exec_module(finetune)

WORDS = "the a cat dog sat ran on under mat log big small red blue".split()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 1-layer Llama with a word-level tokenizer, both built here and saved like a hub model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {token: i for i, token in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(path)
    sizes = {"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "max_position_embeddings": 32}
    return save_tiny_llama(path, **sizes, pad_token_id=1, bos_token_id=2, eos_token_id=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    path = tmp_path_factory.mktemp("data")
    gen = torch.Generator().manual_seed(0)
    files = []
    for split, n in (("train", 24), ("eval", 8)):
        rows = []
        for _ in range(n):
            words = [
                WORDS[int(i)]
                for i in torch.randint(len(WORDS), (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen)
            ]
            rows.append({"text": " ".join(words), "label": int("cat" in words)})
        file = path / f"{split}.jsonl"
        file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files.append(file)
    return files[0], files[1]


def run(model: Path, data: tuple[Path, Path], out: Path, **options) -> dict[str, float]:
    values = dict(
        model_path=str(model),
        train_file=str(data[0]),
        eval_file=str(data[1]),
        output_dir=str(out),
        lora_r=2,
        lora_alpha=4.0,
        steps=6,
        batch_size=4,
        eval_every=3,
        save_every=3,
        log_every=2,
        dtype="float64",
        optimizer_kwargs={"lr": 1e-2},
    )
    values.update(options)
    return finetune.main(**values)


def test_causal_lm_trains_evaluates_and_writes_metrics(tiny_llama, data, tmp_path, capsys):
    metrics = run(tiny_llama, data, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["step"] == 6 and 0 < metrics["grad_norm"] and 1 < metrics["eval_perplexity"] < float("inf")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step=")]
    assert [line.split()[0] for line in lines] == ["step=2", "step=4", "step=6"]  # not a terminal: a line every 2 steps
    assert "grad_norm=" in lines[-1] and "eval_loss=" in lines[-1]


def test_resume_equals_an_uninterrupted_run(tiny_llama, data, tmp_path):
    run(tiny_llama, data, tmp_path / "whole")
    run(tiny_llama, data, tmp_path / "cut", stop_at=3)
    run(tiny_llama, data, tmp_path / "cut")  # finds checkpoint.pt at step 3 and continues
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert cut["step"] == whole["step"] == 6
    for name, value in whole["model"].items():
        assert torch.equal(cut["model"][name], value), name


def test_sequence_classification_with_another_optimizer_through_the_cli(tiny_llama, data, tmp_path):
    command = [
        sys.executable,
        str(EXAMPLES / "finetune.py"),
        f"--model_path={tiny_llama}",
        f"--train_file={data[0]}",
        f"--eval_file={data[1]}",
        f"--output_dir={tmp_path}",
        "--task=sequence_classification",
        "--optimizer=torch.optim.SGD",
        "--optimizer_kwargs={lr: 0.05, momentum: 0.9}",
        "--wrapper_options={schedule: both}",
        "--steps=4",
        "--batch_size=4",
        "--lora_r=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", **_env()})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 4 and 0 <= metrics["eval_accuracy"] <= 1


def _env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
