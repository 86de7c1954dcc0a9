"""Task metrics: accuracy (classification, label generation) and perplexity (language modelling).

Works for ShadowPEFT models (pass ``mode``) and for any HF / peft model (``mode=None``).
:func:`score_examples` scores each answer with a confidence, for selective prediction: an example
of a classification or generation task, or each predicted token of a language-modelling text.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shadowpeft.train.datasets import GenerationExample, TaskData
from shadowpeft.train.encoding import IGNORE_INDEX, PadCollator, encode_prompt, encode_task


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


@dataclass(frozen=True)
class ExampleScores:
    """Per-example correctness and confidence of one model (in one ``mode``) on one split.

    For a language-modelling task the "examples" are the predicted tokens of the test texts (see
    :func:`score_examples`), so ``examples`` counts tokens, not texts.

    Attributes:
        mode: ``attached``, ``detached`` or ``None`` (a plain HF / peft model).
        correct: Whether each example was answered correctly, in split order (tokens in text order).
        confidence: The model's confidence in each answer, in [0, 1]: the largest class probability
            (classification), the probability of the first generated token (generation), or the
            largest next-token probability at that position (language modelling, teacher-forced).
    """

    mode: str | None
    correct: tuple[bool, ...]
    confidence: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.correct) != len(self.confidence):
            raise ValueError(
                f"ExampleScores has {len(self.correct)} correctness flags but {len(self.confidence)} confidences; "
                "give one of each per example."
            )

    @property
    def examples(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        """Share of correct examples; 0.0 when there are none."""
        return sum(self.correct) / max(len(self.correct), 1)


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
    """Evaluate ``model`` on ``task.test`` (its :func:`evaluation_subset` of ``limit`` examples when given).

    Classification: argmax of the class logits. Generation: greedy decode and exact match of the
    stripped, lower-cased text with the completion. LM: ``exp`` of the mean token CE.
    """
    with _eval_mode(model):
        subset = TaskData(task.name, task.kind, (), evaluation_subset(task.test, limit), task.labels)
        if task.kind == "lm":
            return _perplexity(model, subset, tokenizer, mode, max_length, batch_size)
        # Without confidence generate() is called as before, so wrappers whose generate returns only the
        # token ids (benchmarks/accuracy.py's OnDevice) keep working.
        args = (model, subset, tokenizer, mode, max_length, batch_size, max_new_tokens)
        correct, _ = _score_subset(*args, with_confidence=False)
        return EvalResult("accuracy", sum(correct) / max(len(correct), 1), len(correct), mode)


@torch.inference_mode()
def score_examples(
    model: nn.Module,
    task: TaskData,
    tokenizer: Any,
    *,
    mode: str | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    limit: int | None = None,
) -> ExampleScores:
    """Score each example of ``task.test`` (the :func:`evaluation_subset` of ``limit`` when given).

    Classification: correct when the argmax of the class logits is the label; confidence is the
    largest softmax probability of the class logits. Generation: greedy decode, correct on an exact
    match (:func:`normalise_answer`); confidence is the probability of the first generated token,
    the largest softmax probability of the first decoding step's raw logits. Language modelling:
    every predicted token of the test texts is an example, scored teacher-forced (one forward per
    batch): at each real position ``t`` whose next token is a label (labels != -100), correct when
    the argmax of the logits is token ``t + 1``; confidence is the largest softmax probability
    (float32, temperature 1) of those logits, the same measure the runtime's token-level escalation
    reads from the detached shadow's logits at each step. ``limit`` counts texts, not tokens.

    Args:
        model: A ShadowPEFT model (pass ``mode``) or any HF / peft model (``mode=None``).
        task: A classification, generation or language-modelling task.
        tokenizer: The model's tokenizer.
        mode: ``attached`` or ``detached`` for ShadowPEFT models.
        max_length: Tokens kept per input.
        batch_size: Examples (texts, for language modelling) per forward / generate call.
        max_new_tokens: Generation budget; by default the longest completion plus 2 tokens.
        limit: Score a fixed random subset of this many examples (texts, for language modelling).
    """
    with _eval_mode(model):
        subset = TaskData(task.name, task.kind, (), evaluation_subset(task.test, limit), task.labels)
        args = (model, subset, tokenizer, mode, max_length, batch_size, max_new_tokens)
        correct, confidence = _score_subset(*args, with_confidence=True)
    assert confidence is not None  # asked for
    return ExampleScores(mode, tuple(correct), tuple(confidence))


def _score_subset(
    model, task, tokenizer, mode, max_length, batch_size, max_new_tokens, *, with_confidence: bool
) -> tuple[list[bool], list[float] | None]:
    """Per-example correctness, and confidence when asked (always computed for classification and LM: it is free)."""
    if task.kind == "classification":
        return _classification_scores(model, task, tokenizer, mode, max_length, batch_size)
    if task.kind == "lm":
        return _token_scores(model, task, tokenizer, mode, max_length, batch_size)
    return _generation_scores(model, task, tokenizer, mode, max_length, batch_size, max_new_tokens, with_confidence)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
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


def _test_logits(model, task, tokenizer, mode, max_length, batch_size) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per batch of ``task.test``, encoded as training encodes it and right-padded."""
    rows = encode_task(task, tokenizer, split="test", max_length=max_length)
    collate = PadCollator.for_tokenizer(tokenizer, side="right")
    for batch in _batches(rows, batch_size):
        inputs = _on_device(collate(list(batch)), model)
        labels = inputs.pop("labels")
        yield model(**inputs, **_mode_kwargs(mode)).logits, labels


def _classification_scores(model, task, tokenizer, mode, max_length, batch_size) -> tuple[list[bool], list[float]]:
    correct: list[bool] = []
    confidence: list[float] = []
    for logits, labels in _test_logits(model, task, tokenizer, mode, max_length, batch_size):  # logits (B, C)
        correct += (logits.argmax(-1) == labels).tolist()
        confidence += _top_probability(logits)
    return correct, confidence


def _token_scores(model, task, tokenizer, mode, max_length, batch_size) -> tuple[list[bool], list[float]]:
    """Teacher-forced next-token scores of every predicted token, texts in split order, tokens in text order."""
    correct: list[bool] = []
    confidence: list[float] = []
    for logits, labels in _test_logits(model, task, tokenizer, mode, max_length, batch_size):
        logits = logits[:, :-1]  # (B, T-1, V): position t predicts t + 1
        targets = labels[:, 1:]  # (B, T-1); -100 on padding
        predicted = targets != IGNORE_INDEX
        # Only the predicted positions, row-major: softmax over (N, V), not over the padded (B, T-1, V).
        kept = logits[predicted]  # (N, V)
        correct += (kept.argmax(-1) == targets[predicted]).tolist()
        confidence += _top_probability(kept)
    return correct, confidence


def _top_probability(logits: torch.Tensor) -> list[float]:
    """Largest softmax probability per row of (B, V) logits, computed in float32."""
    return logits.float().softmax(-1).amax(-1).tolist()


def normalise_answer(text: str) -> str:
    """Compare generated labels case- and whitespace-insensitively, up to the first line break."""
    return text.strip().split("\n")[0].strip().strip(".").lower()


def _generation_scores(
    model, task, tokenizer, mode, max_length, batch_size, max_new_tokens, with_confidence: bool
) -> tuple[list[bool], list[float] | None]:
    examples: tuple[GenerationExample, ...] = task.test
    if not examples:
        return [], [] if with_confidence else None
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.completion).input_ids) for e in examples)
        max_new_tokens = longest + 2
    collate = PadCollator.for_tokenizer(tokenizer, side="left")
    # The raw logits of the first decoding step give the first token's probability.
    extra = {"output_logits": True, "return_dict_in_generate": True} if with_confidence else {}
    correct: list[bool] = []
    confidence: list[float] = []
    for batch in _batches(examples, batch_size):
        # The same prompt tokens as training (encoding.encode_prompt), left-padded for batched generation.
        inputs = _on_device(collate([encode_prompt(e.prompt, tokenizer, max_length=max_length) for e in batch]), model)
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=collate.pad_token_id,
            **extra,
            **_mode_kwargs(mode),
        )
        sequences = out  # (B, T + new)
        if with_confidence:
            if isinstance(out, torch.Tensor):
                raise TypeError(
                    f"{type(model).__name__}.generate returned a tensor although return_dict_in_generate=True; "
                    "score_examples needs the GenerateOutput (sequences and logits). Pass those arguments through "
                    "and return the output object unchanged."
                )
            confidence += _top_probability(out.logits[0])  # the first step's raw logits: (B, V)
            sequences = out.sequences
        texts = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += [normalise_answer(t) == normalise_answer(e.completion) for t, e in zip(texts, batch, strict=True)]
    return correct, confidence if with_confidence else None


def _perplexity(model, task, tokenizer, mode, max_length, batch_size) -> EvalResult:
    total_loss, total_tokens, texts = 0.0, 0, 0
    for logits, labels in _test_logits(model, task, tokenizer, mode, max_length, batch_size):
        shift_logits, shift_labels = logits.float()[:, :-1], labels[:, 1:]
        loss = nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_loss += float(loss)
        total_tokens += int((shift_labels != -100).sum())
        texts += labels.shape[0]
    return EvalResult("perplexity", math.exp(total_loss / max(total_tokens, 1)), texts, mode)


def classification_labels(task: TaskData) -> dict[str, int]:
    """Label name -> class index, in the task's (sorted) label order."""
    return {label: i for i, label in enumerate(task.labels)}
