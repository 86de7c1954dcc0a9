"""Turn task examples into token ids for a Hugging Face tokenizer, and pad them into batches.

Generation examples are trained on the completion only. With a chat template (ChatML shown)::

    <|im_start|>system ...<|im_end|> <|im_start|>user {prompt}<|im_end|> <|im_start|>assistant | {completion}<|im_end|>
    labels: -100 on every token left of the bar                                                | the token ids

The completion ends with the template's end-of-turn token (``<|im_end|>`` for ChatML), or the
tokenizer's EOS when there is no template, so the model learns to stop. Without a template the
completion is appended to the prompt verbatim: put any separator (space, newline) in the data.
A prompt that does not fit ``max_length`` loses tokens on the left; the completion is never cut.

Padding: tokenizers without a pad token are padded with their EOS id. This is safe because
padded positions carry ``attention_mask`` 0 and label -100; labels never depend on the pad id,
so an EOS inside a completion stays a training target even when pad and EOS are the same token.
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from shadowpeft.errors import DataError
from shadowpeft.train.datasets import ClassificationExample, GenerationExample, TaskData, TextExample

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Rendered as an assistant reply to find what the chat template writes after a turn.
_SENTINEL = "ShadowpeftSentinelReply"
FEATURE_KEYS = ("input_ids", "attention_mask", "labels")

Features = dict[str, Any]


def use_chat_template(tokenizer: PreTrainedTokenizerBase, chat: bool | None = None) -> bool:
    """Decide whether prompts go through the tokenizer's chat template.

    Args:
        tokenizer: The tokenizer.
        chat: True to require the template, False to never use it, None to use it when there is one.

    Returns:
        Whether to apply the chat template.

    Raises:
        DataError: ``chat=True`` but the tokenizer has no chat template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise DataError(
            f"chat=True but the tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '?')!r}) has no chat template. "
            "Pass chat=False for plain prompts, or chat=None to decide automatically."
        )
    return has_template if chat is None else chat


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool | None = None) -> str:
    """Wrap a prompt as a user turn followed by the assistant generation prompt, if chat applies.

    Args:
        tokenizer: The tokenizer.
        prompt: The user's text.
        chat: See :func:`use_chat_template`.

    Returns:
        The rendered chat text, or ``prompt`` unchanged without a chat template.
    """
    if not use_chat_template(tokenizer, chat):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase, *, chat: bool | None = None) -> int:
    """The token that ends a completion: the chat template's end-of-turn token, else EOS.

    The end-of-turn token is the first special token the template writes after an assistant reply
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma).

    Args:
        tokenizer: The tokenizer.
        chat: See :func:`use_chat_template`.

    Returns:
        The token id.

    Raises:
        DataError: Neither the template nor the tokenizer defines an end token.
    """
    if use_chat_template(tokenizer, chat):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        _, found, suffix = rendered.partition(_SENTINEL)
        special = set(tokenizer.all_special_ids)
        after = tokenizer(suffix, add_special_tokens=False)["input_ids"] if found else []
        for token_id in after:
            if token_id in special:
                return token_id
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"The tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no EOS token and no chat template "
            "end-of-turn token, so a completion cannot be terminated. Set tokenizer.eos_token."
        )
    return tokenizer.eos_token_id


def resolve_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id to batch with: the tokenizer's pad token, else its EOS (see the module docstring).

    Args:
        tokenizer: The tokenizer.

    Returns:
        The token id.

    Raises:
        DataError: The tokenizer has neither a pad nor an EOS token.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise DataError(
        f"The tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an EOS token. "
        "Set tokenizer.pad_token before encoding."
    )


def encode_prompt(
    prompt: str, tokenizer: PreTrainedTokenizerBase, *, max_length: int, chat: bool | None = None
) -> Features:
    """Tokenize a formatted prompt for generation, keeping its last ``max_length`` tokens.

    Args:
        prompt: The user's text.
        tokenizer: The tokenizer.
        max_length: Maximum number of tokens.
        chat: See :func:`use_chat_template`.

    Returns:
        ``input_ids`` and ``attention_mask`` lists.
    """
    ids = _prompt_ids(prompt, tokenizer, use_chat_template(tokenizer, chat))[-max_length:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _prompt_ids(prompt: str, tokenizer: PreTrainedTokenizerBase, use_chat: bool) -> list[int]:
    """Token ids of the formatted prompt, uncut."""
    text = format_prompt(tokenizer, prompt, chat=use_chat)
    # A rendered template already holds its special tokens; a plain prompt gets the tokenizer's own (BOS).
    return tokenizer(text, add_special_tokens=not use_chat)["input_ids"]


def encode_generation(
    example: GenerationExample, tokenizer: PreTrainedTokenizerBase, *, max_length: int, chat: bool | None = None
) -> Features:
    """Tokenize prompt + completion + end token, with the prompt masked out of the labels.

    Args:
        example: The example.
        tokenizer: The tokenizer.
        max_length: Maximum total tokens; the prompt is cut from the left to fit.
        chat: See :func:`use_chat_template`.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` lists (-100 on prompt tokens).

    Raises:
        DataError: The completion and its end token alone need ``max_length`` tokens or more.
    """
    use_chat = use_chat_template(tokenizer, chat)
    end_id = end_of_turn_id(tokenizer, chat=use_chat)
    features, _ = _encode_generation(example, tokenizer, max_length, use_chat, end_id)
    return features


def _encode_generation(
    example: GenerationExample, tokenizer: PreTrainedTokenizerBase, max_length: int, use_chat: bool, end_id: int
) -> tuple[Features, bool]:
    """:func:`encode_generation` with the chat decision and end token precomputed; also says if it truncated."""
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [end_id]
    room = max_length - len(completion)
    if room < 1:
        raise DataError(
            f"The completion {example.completion[:60]!r} is {len(completion)} tokens with its end token, which "
            f"leaves no room for the prompt within max_length={max_length}. Raise max_length or shorten it."
        )
    full = _prompt_ids(example.prompt, tokenizer, use_chat)
    prompt = full[-room:]
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, len(full) > room


def encode_classification(
    example: ClassificationExample,
    tokenizer: PreTrainedTokenizerBase,
    label_ids: dict[str, int],
    *,
    max_length: int,
) -> Features:
    """Tokenize a text (cut on the right to ``max_length``) and map its label to a class index.

    Args:
        example: The example.
        tokenizer: The tokenizer; its special tokens (e.g. BOS) are added as it would by default.
        label_ids: Class name to index, e.g. ``{name: i for i, name in enumerate(task.labels)}``.
        max_length: Maximum number of tokens.

    Returns:
        ``input_ids`` and ``attention_mask`` lists and ``labels`` as an int.

    Raises:
        DataError: The label is not in ``label_ids``.
    """
    if example.label not in label_ids:
        raise DataError(
            f"Label {example.label!r} of text {example.text[:60]!r} is not one of the task's labels "
            f"({', '.join(label_ids)}). Use the labels the classifier was built with."
        )
    ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label_ids[example.label]}


def encode_text(example: TextExample, tokenizer: PreTrainedTokenizerBase, *, max_length: int) -> Features:
    """Tokenize text for language modelling (cut on the right); every token is a target.

    Args:
        example: The example.
        tokenizer: The tokenizer.
        max_length: Maximum number of tokens.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` (a copy of ``input_ids``; the collator
        puts -100 on padding).
    """
    ids = tokenizer(example.text, truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def encode_task(
    task: TaskData,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: Literal["train", "test"],
    max_length: int,
    chat: bool | None = None,
) -> list[Features]:
    """Encode one split of a task with the encoder for its kind.

    Args:
        task: The task.
        tokenizer: The tokenizer.
        split: ``"train"`` or ``"test"``.
        max_length: Maximum tokens per example.
        chat: Chat template use for generation tasks (see :func:`use_chat_template`); ignored otherwise.

    Returns:
        One feature dict per example, in split order (unpadded; batch them with :class:`PadCollator`).

    Raises:
        DataError: Bad ``split`` or ``max_length``, or an example that cannot be encoded.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'.")
    if max_length < 2:
        raise DataError(f"max_length={max_length!r} must be at least 2 tokens.")
    examples = task.train if split == "train" else task.test
    if task.kind == "classification":
        label_ids = {name: index for index, name in enumerate(task.labels)}
        return [encode_classification(e, tokenizer, label_ids, max_length=max_length) for e in examples]
    if task.kind == "lm":
        return [encode_text(e, tokenizer, max_length=max_length) for e in examples]
    use_chat = use_chat_template(tokenizer, chat)
    end_id = end_of_turn_id(tokenizer, chat=use_chat)
    encoded = [_encode_generation(e, tokenizer, max_length, use_chat, end_id) for e in examples]
    truncated = sum(flag for _, flag in encoded)
    if truncated:
        logger.warning(
            "%d of %d %s prompts of %r were cut on the left to fit max_length=%d",
            truncated,
            len(encoded),
            split,
            task.name,
            max_length,
        )
    return [features for features, _ in encoded]


@dataclass(frozen=True)
class PadCollator:
    """Batch feature dicts into padded ``torch.long`` tensors (a ``data_collator`` for HF ``Trainer``).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and sequence
    ``labels`` with -100; integer ``labels`` (classification) are stacked into a ``(B,)`` tensor.
    ``side="left"`` pads on the left, as batched generation at evaluation time needs.

    Attributes:
        pad_token_id: Id written into padded ``input_ids`` (see :func:`resolve_pad_token_id`).
        side: ``"right"`` (training) or ``"left"`` (generation).
    """

    pad_token_id: int
    _: KW_ONLY
    side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.side not in ("right", "left"):
            raise DataError(f"PadCollator side={self.side!r} must be 'right' or 'left'.")

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, *, side: Literal["right", "left"] = "right"
    ) -> PadCollator:
        """A collator padding with :func:`resolve_pad_token_id` of ``tokenizer``."""
        return cls(resolve_pad_token_id(tokenizer), side=side)

    def __call__(self, features: list[Features]) -> dict[str, torch.Tensor]:
        """Pad and stack a list of feature dicts.

        Args:
            features: Dicts with the same keys among ``input_ids``, ``attention_mask``, ``labels``.

        Returns:
            ``(B, T)`` long tensors (``labels`` is ``(B,)`` when the labels are ints).

        Raises:
            DataError: Empty batch, differing or unknown keys.
        """
        if not features:
            raise DataError("PadCollator got an empty batch.")
        keys = list(features[0])
        unknown = [key for key in keys if key not in FEATURE_KEYS]
        if unknown or any(list(f) != keys for f in features):
            raise DataError(
                f"PadCollator needs every feature dict to have the same keys among {', '.join(FEATURE_KEYS)}; "
                f"got {sorted({tuple(f) for f in features})}."
            )
        width = max(len(f["input_ids"]) for f in features)
        batch = {}
        for key in keys:
            values = [f[key] for f in features]
            if key == "labels" and isinstance(values[0], int):
                batch[key] = torch.tensor(values, dtype=torch.long)
                continue
            fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}[key]
            batch[key] = torch.tensor([self._pad(list(v), width, fill) for v in values], dtype=torch.long)
        return batch

    def _pad(self, values: list[int], width: int, fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + values if self.side == "left" else values + padding
