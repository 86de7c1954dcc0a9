"""Task metrics: accuracy (classification, label generation) and perplexity (language modelling).

Works for ShadowPEFT models (pass ``mode``) and for any HF / peft model (``mode=None``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shadowpeft.datasets import GenerationExample, TaskData
from shadowpeft.encoding import PadCollator, encode_prompt, encode_task


@dataclass(frozen=True)
class EvalResult:
    """One metric on one split. ``metric`` is ``accuracy`` or ``perplexity``."""

    metric: str
    value: float
    examples: int
    mode: str | None

    def describe(self) -> str:
        where = f" ({self.mode})" if self.mode else ""
        shown = f"{100 * self.value:.2f}%" if self.metric == "accuracy" else f"{self.value:.3f}"
        return f"{self.metric}{where}: {shown} on {self.examples} examples"


def _mode_kwargs(mode: str | None) -> dict[str, Any]:
    return {} if mode is None else {"mode": mode}


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    task: TaskData,
    tokenizer: Any,
    *,
    mode: str | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``task.test`` (the first ``limit`` examples when given).

    Classification: argmax of the class logits. Generation: greedy decode and exact match of the
    stripped, lower-cased text with the completion. LM: ``exp`` of the mean token CE.
    """
    was_training = model.training
    model.eval()
    try:
        subset = TaskData(task.name, task.kind, (), evaluation_subset(task.test, limit), task.labels)
        if task.kind == "classification":
            return _classification_accuracy(model, subset, tokenizer, mode, max_length, batch_size)
        if task.kind == "generation":
            return _generation_accuracy(model, subset, tokenizer, mode, max_length, batch_size, max_new_tokens)
        return _perplexity(model, subset, tokenizer, mode, max_length, batch_size)
    finally:
        model.train(was_training)


def evaluation_subset(examples: Sequence[Any], limit: int | None) -> tuple[Any, ...]:
    """A fixed random subset of ``limit`` examples, in their original order (all when ``limit`` is None).

    Not the first ``limit``: a split can be sorted by label (the sentiment corpus is).
    """
    if not limit or limit >= len(examples):
        return tuple(examples)
    keep = sorted(random.Random(0).sample(range(len(examples)), limit))
    return tuple(examples[i] for i in keep)


def _on_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def _classification_accuracy(model, task, tokenizer, mode, max_length, batch_size) -> EvalResult:
    rows = encode_task(task, tokenizer, split="test", max_length=max_length)
    collate = PadCollator.for_tokenizer(tokenizer, side="right")
    correct = 0
    for batch in _batches(rows, batch_size):
        inputs = _on_device(collate(list(batch)), model)
        labels = inputs.pop("labels")
        logits = model(**inputs, **_mode_kwargs(mode)).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return EvalResult("accuracy", correct / max(len(rows), 1), len(rows), mode)


def normalise_answer(text: str) -> str:
    """Compare generated labels case- and whitespace-insensitively, up to the first line break."""
    return text.strip().split("\n")[0].strip().strip(".").lower()


def _generation_accuracy(model, task, tokenizer, mode, max_length, batch_size, max_new_tokens) -> EvalResult:
    examples: tuple[GenerationExample, ...] = task.test
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.completion).input_ids) for e in examples)
        max_new_tokens = longest + 2
    collate = PadCollator.for_tokenizer(tokenizer, side="left")
    correct = 0
    for batch in _batches(examples, batch_size):
        # The same prompt tokens as training (encoding.encode_prompt), left-padded for batched generation.
        inputs = _on_device(collate([encode_prompt(e.prompt, tokenizer, max_length=max_length) for e in batch]), model)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=collate.pad_token_id,
            **_mode_kwargs(mode),
        )
        texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(
            normalise_answer(t) == normalise_answer(e.completion) for t, e in zip(texts, batch, strict=True)
        )
    return EvalResult("accuracy", correct / max(len(examples), 1), len(examples), mode)


def _perplexity(model, task, tokenizer, mode, max_length, batch_size) -> EvalResult:
    rows = encode_task(task, tokenizer, split="test", max_length=max_length)
    collate = PadCollator.for_tokenizer(tokenizer, side="right")
    total_loss, total_tokens = 0.0, 0
    for batch in _batches(rows, batch_size):
        inputs = _on_device(collate(list(batch)), model)
        labels = inputs.pop("labels")
        logits = model(**inputs, **_mode_kwargs(mode)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_loss += float(loss)
        total_tokens += int((shift_labels != -100).sum())
    return EvalResult("perplexity", math.exp(total_loss / max(total_tokens, 1)), len(rows), mode)


def classification_labels(task: TaskData) -> dict[str, int]:
    """Label name -> class index, in the task's (sorted) label order."""
    return {label: i for i, label in enumerate(task.labels)}
