"""Fine-tune a Hugging Face model from a local path with peft LoRA, through LowRankWrapper.

Any torch optimizer is the base (``--optimizer torch.optim.AdamW --optimizer_kwargs '{lr: 2e-4}'``);
the wrapper lifts it to the LoRA pairs and clips full-space norms (``--max_grad_norm``). Data are
JSON lines with a ``text`` field (and an integer ``label`` for sequence classification).

    python examples/finetune.py --model_path ./my-llama --train_file train.jsonl --eval_file eval.jsonl \\
        --task causal_lm --steps 1000 --output_dir runs/llama-lora
    python examples/finetune.py --config examples/configs/finetune.yaml --model_path ./my-llama ...

Progress: tqdm bars on a terminal; elsewhere a line every ``--log_every`` steps. Every
``--save_every`` steps the trainable weights, the optimizer, the LR schedule and the step go to
``output_dir/checkpoint.pt``; a run finds it there and resumes (bit-identically: the batch order
is a function of the seed and the step). At the end, ``output_dir/metrics.json`` and the adapter
(``output_dir/adapter``, peft's format).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import peft
import torch
import transformers
from jsonargparse import auto_cli
from torch import Tensor, nn
from tqdm import tqdm

import lowrank_opt as lo

Task = Literal["causal_lm", "sequence_classification"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def read_jsonl(path: str, task: Task) -> list[dict[str, Any]]:
    """Examples from a JSON-lines file: ``text``, and ``label`` for classification."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    required = ("text", "label") if task == "sequence_classification" else ("text",)
    for i, row in enumerate(rows):
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"{path}, line {i + 1}: missing {missing} (task {task})")
    if not rows:
        raise ValueError(f"{path} has no example")
    return rows


def collate(rows: list[dict[str, Any]], tokenizer: Any, task: Task, max_length: int) -> dict[str, Tensor]:
    batch = tokenizer(
        [row["text"] for row in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    if task == "causal_lm":
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100  # padding is not predicted
    else:
        labels = torch.tensor([int(row["label"]) for row in rows])
    return {**batch, "labels": labels}


def batch_rows(rows: list[dict[str, Any]], step: int, batch_size: int, seed: int) -> list[dict[str, Any]]:
    """The batch of ``step``: a function of the seed and the step only, so a resumed run sees the same data."""
    per_epoch = len(rows) // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [rows[i] for i in order[index * batch_size : (index + 1) * batch_size]]


def load_model(model_path: str, task: Task, num_labels: int, dtype: torch.dtype, tokenizer: Any) -> nn.Module:
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, dtype=dtype, local_files_only=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, Tensor]], task: Task) -> dict[str, float]:
    model.eval()
    losses, correct, seen = [], 0, 0
    for batch in batches:
        out = model(**batch)
        losses.append(out.loss.item())
        if task == "sequence_classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
    model.train()
    metrics = {"eval_loss": sum(losses) / len(losses)}
    if task == "causal_lm":
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    else:
        metrics["eval_accuracy"] = correct / seen
    return metrics


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: nn.Module, opt: lo.LowRankWrapper, scheduler: Any, step: int) -> None:
    """Written whole, then renamed: an interrupted save leaves the previous checkpoint intact."""
    state = {"model": trainable_state(model), "optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
    rng = {"cpu": torch.get_rng_state()}  # dropout draws from it
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    partial = path.with_suffix(".tmp")
    torch.save({**state, "step": step, "rng": rng}, partial)
    os.replace(partial, path)


def main(
    model_path: str,
    train_file: str,
    eval_file: str | None = None,
    task: Task = "causal_lm",
    num_labels: int = 2,
    output_dir: str = "runs/finetune",
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    optimizer: str = "torch.optim.AdamW",
    optimizer_kwargs: dict[str, Any] | None = None,
    rule: str | None = None,
    rule_options: dict[str, Any] | None = None,
    wrapper_options: dict[str, Any] | None = None,
    max_grad_norm: float | None = 1.0,
    steps: int = 100,
    warmup_steps: int = 0,
    batch_size: int = 8,
    max_length: int = 128,
    eval_every: int = 50,
    save_every: int = 50,
    log_every: int = 10,
    resume: bool = True,
    stop_at: int | None = None,
    seed: int = 0,
    dtype: Literal["float32", "float64", "bfloat16"] = "float32",
    device: str = "cpu",
) -> dict[str, float]:
    """Fine-tune with LoRA through lowrank_opt and write output_dir/metrics.json.

    Args:
        model_path: a local Hugging Face model directory (weights, config and tokenizer).
        train_file: JSON lines with ``text`` (and ``label`` for sequence classification).
        eval_file: the same format; evaluated every ``eval_every`` steps and at the end.
        task: ``causal_lm`` or ``sequence_classification``.
        num_labels: classes, for sequence classification.
        output_dir: checkpoint, adapter and metrics.json go here.
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha (scale alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the LoRA input.
        target_modules: module names to adapt; peft's default for the architecture when omitted.
        use_rslora: rank-stabilised scale.
        use_dora: DoRA (its magnitude vector is trained by the base optimizer).
        optimizer: the base optimizer class, as a dotted path.
        optimizer_kwargs: its keyword arguments (default ``{lr: 2e-4}``).
        rule: the calibration rule; ``None`` picks the one registered for the optimizer.
        rule_options: the rule's options.
        wrapper_options: other LowRankWrapper options (``schedule``, ...).
        max_grad_norm: clip the total full-space gradient norm (``None``: no clipping).
        steps: optimizer steps in all (a resumed run continues up to it).
        warmup_steps: linear warm-up, then cosine decay to zero.
        batch_size: examples per step.
        max_length: tokens per example.
        eval_every: steps between evaluations (0: only at the end).
        save_every: steps between checkpoints (0: only at the end).
        log_every: steps between progress lines when stderr is not a terminal.
        resume: continue from output_dir/checkpoint.pt when it exists.
        stop_at: stop after this step with a checkpoint (a job with a time limit); a later run
            with the same settings resumes there and ends as if never stopped.
        seed: LoRA initialisation and batch order.
        dtype: the model's dtype.
        device: where to train.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    train_rows = read_jsonl(train_file, task)
    if len(train_rows) < batch_size:
        raise ValueError(f"{train_file} has {len(train_rows)} examples, fewer than batch_size={batch_size}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model = load_model(model_path, task, num_labels, DTYPES[dtype], tokenizer)
    config = peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM if task == "causal_lm" else peft.TaskType.SEQ_CLS,
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
    )
    model = peft.get_peft_model(model, config).to(device)
    opt = lo.build(
        model,
        optimizer,
        rule=rule,
        rule_options=rule_options,
        max_grad_norm=max_grad_norm,
        **(optimizer_kwargs if optimizer_kwargs is not None else {"lr": 2e-4}),
        **(wrapper_options or {}),
    )

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = 0
    if resume and checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in checkpoint["model"]:
                    p.copy_(checkpoint["model"][name])
        opt.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"]["cpu"].cpu())
        if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(checkpoint["rng"]["cuda"].cpu()))
        start = int(checkpoint["step"])

    def to_device(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {key: value.to(device) for key, value in batch.items()}

    eval_batches = []
    if eval_file is not None:
        eval_rows = read_jsonl(eval_file, task)
        eval_batches = [
            to_device(collate(eval_rows[i : i + batch_size], tokenizer, task, max_length))
            for i in range(0, len(eval_rows), batch_size)
        ]

    bar = tqdm(total=steps, initial=start, desc="fine-tune", disable=not sys.stderr.isatty(), file=sys.stderr)
    metrics: dict[str, float] = {}
    recent: list[float] = []
    began = time.perf_counter()
    model.train()
    end = steps if stop_at is None else min(stop_at, steps)
    for step in range(start, end):
        batch = to_device(collate(batch_rows(train_rows, step, batch_size, seed), tokenizer, task, max_length))
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        scheduler.step()
        recent = (recent + [loss.item()])[-log_every:]
        done = step + 1
        metrics.update(step=done, train_loss=sum(recent) / len(recent), lr=scheduler.get_last_lr()[0])
        if opt.last_grad_norm is not None:
            metrics["grad_norm"] = opt.last_grad_norm.item()
        if eval_batches and eval_every and done % eval_every == 0 and done < steps:
            metrics.update(evaluate(model, eval_batches, task))
        if save_every and done % save_every == 0:
            save_checkpoint(checkpoint_path, model, opt, scheduler, done)
        bar.update(1)
        bar.set_postfix({key: f"{value:.4g}" for key, value in metrics.items() if key != "step"}, refresh=False)
        if bar.disable and (done % log_every == 0 or done == end):
            print(" ".join(f"{key}={value:.4g}" for key, value in metrics.items()), file=sys.stderr, flush=True)
    bar.close()
    if eval_batches:
        metrics.update(evaluate(model, eval_batches, task))
    metrics["train_seconds"] = time.perf_counter() - began
    save_checkpoint(checkpoint_path, model, opt, scheduler, max(start, end))
    model.save_pretrained(out / "adapter")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    auto_cli(main, as_positional=False)
