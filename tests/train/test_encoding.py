"""Encoding on the real SmolLM2 tokenizer (ChatML): prompt masking, end-of-turn, truncation, padding."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import AutoTokenizer

from shadowpeft.checkpoint.assets import smollm2_dir
from shadowpeft.errors import DataError
from shadowpeft.train.datasets import ClassificationExample, GenerationExample, TaskData, TextExample
from shadowpeft.train.encoding import (
    IGNORE_INDEX,
    PadCollator,
    encode_classification,
    encode_generation,
    encode_prompt,
    encode_task,
    encode_text,
    end_of_turn_id,
    format_prompt,
    resolve_pad_token_id,
)
from tests.slow.conftest import requires_smollm2

pytestmark = requires_smollm2

EXAMPLE = GenerationExample(prompt="Name the intent.\nUtterance: play some jazz\nIntent:", completion="play_music")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same vocabulary without a chat template or a pad token."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    plain.pad_token = None
    return plain


def completion_part(features: dict) -> list[int]:
    return [t for t, label in zip(features["input_ids"], features["labels"], strict=True) if label != IGNORE_INDEX]


def test_format_prompt(tokenizer, plain_tokenizer) -> None:
    chat = format_prompt(tokenizer, "Hi there")
    assert chat.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert format_prompt(tokenizer, "Hi there", chat=False) == "Hi there"
    assert format_prompt(plain_tokenizer, "Hi there") == "Hi there"
    with pytest.raises(DataError, match="chat=True but the tokenizer .* has no chat template. Pass chat=False"):
        format_prompt(plain_tokenizer, "Hi there", chat=True)


def test_end_of_turn_is_im_end(tokenizer, plain_tokenizer) -> None:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == im_end
    assert end_of_turn_id(plain_tokenizer) == plain_tokenizer.eos_token_id


def test_generation_masks_exactly_the_prompt(tokenizer) -> None:
    features = encode_generation(EXAMPLE, tokenizer, max_length=256, chat=None)
    prompt = encode_prompt(EXAMPLE.prompt, tokenizer, max_length=256)["input_ids"]
    n = len(prompt)
    assert features["input_ids"][:n] == prompt
    assert features["labels"][:n] == [IGNORE_INDEX] * n
    assert features["labels"][n:] == features["input_ids"][n:]
    assert features["attention_mask"] == [1] * len(features["input_ids"])
    assert tokenizer.decode(completion_part(features)) == "play_music<|im_end|>"
    assert tokenizer.decode(prompt).startswith("<|im_start|>system")  # the template adds its own specials


def test_generation_without_chat_template_ends_with_eos(plain_tokenizer) -> None:
    features = encode_generation(EXAMPLE, plain_tokenizer, max_length=256, chat=None)
    assert plain_tokenizer.decode(features["input_ids"]) == EXAMPLE.prompt + EXAMPLE.completion + "<|im_end|>"
    assert completion_part(features)[-1] == plain_tokenizer.eos_token_id


def test_truncation_cuts_the_prompt_on_the_left_and_keeps_the_completion(tokenizer) -> None:
    full = encode_generation(EXAMPLE, tokenizer, max_length=512)
    completion = completion_part(full)
    short = encode_generation(EXAMPLE, tokenizer, max_length=len(completion) + 5)
    assert len(short["input_ids"]) == len(completion) + 5
    assert completion_part(short) == completion
    assert short["input_ids"][:5] == full["input_ids"][len(full["input_ids"]) - len(completion) - 5 : -len(completion)]
    with pytest.raises(DataError, match=r"is 4 tokens with its end token.*max_length=4\. Raise max_length"):
        encode_generation(EXAMPLE, tokenizer, max_length=len(completion))


def test_encode_classification(tokenizer) -> None:
    label_ids = {"negative": 0, "positive": 1}
    features = encode_classification(
        ClassificationExample("what a lovely day", "positive"), tokenizer, label_ids, max_length=3
    )
    assert features["labels"] == 1 and len(features["input_ids"]) == 3 == len(features["attention_mask"])
    assert features["input_ids"] == tokenizer("what a lovely day")["input_ids"][:3]  # cut on the right
    with pytest.raises(DataError, match=r"Label 'neutral' .* is not one of the task's labels \(negative, positive\)"):
        encode_classification(ClassificationExample("meh", "neutral"), tokenizer, label_ids, max_length=8)


def test_encode_text(tokenizer) -> None:
    features = encode_text(TextExample("To be, or not to be, that is the question"), tokenizer, max_length=6)
    assert features["labels"] == features["input_ids"] and len(features["input_ids"]) == 6


def test_encode_task_per_kind(tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    cls = TaskData("c", "classification", (ClassificationExample("bad", "neg"), ClassificationExample("ok", "pos")),
                   (ClassificationExample("fine", "pos"),), ("neg", "pos"))  # fmt: skip
    assert [f["labels"] for f in encode_task(cls, tokenizer, split="train", max_length=16)] == [0, 1]
    assert [f["labels"] for f in encode_task(cls, tokenizer, split="test", max_length=16)] == [1]
    lm = TaskData("l", "lm", (TextExample("Once upon a time"),), (), ())
    assert encode_task(lm, tokenizer, split="test", max_length=16) == []
    gen = TaskData("g", "generation", (EXAMPLE,), (), ("play_music",))
    with caplog.at_level(logging.WARNING, logger="shadowpeft.train.encoding"):
        (features,) = encode_task(gen, tokenizer, split="train", max_length=12)
    assert "1 of 1 train prompts of 'g' were cut on the left to fit max_length=12" in caplog.text
    assert tokenizer.decode(completion_part(features)) == "play_music<|im_end|>"
    with pytest.raises(DataError, match="split='dev' must be 'train' or 'test'"):
        encode_task(gen, tokenizer, split="dev", max_length=12)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="max_length=1 must be at least 2"):
        encode_task(gen, tokenizer, split="train", max_length=1)


def test_collator_pads_right_and_left() -> None:
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 2]},
        {"input_ids": [8], "attention_mask": [1], "labels": [2]},
    ]
    right = PadCollator(2)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 2], [2, -100, -100]]  # the real EOS (2 = pad) stays a target
    left = PadCollator(2, side="left")(features)
    assert left["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert all(t.dtype == torch.long for t in left.values())
    prompts = PadCollator(0, side="left")(
        [{"input_ids": [4], "attention_mask": [1]}, {"input_ids": [], "attention_mask": []}]
    )
    assert prompts["input_ids"].tolist() == [[4], [0]]


def test_collator_stacks_class_labels_and_checks_keys() -> None:
    batch = PadCollator(0)([{"input_ids": [3, 4], "attention_mask": [1, 1], "labels": 2},
                            {"input_ids": [5], "attention_mask": [1], "labels": 0}])  # fmt: skip
    assert batch["labels"].tolist() == [2, 0] and batch["input_ids"].tolist() == [[3, 4], [5, 0]]
    with pytest.raises(DataError, match="same keys among input_ids, attention_mask, labels"):
        PadCollator(0)(
            [{"input_ids": [1], "attention_mask": [1]}, {"input_ids": [1], "attention_mask": [1], "labels": 1}]
        )
    with pytest.raises(DataError, match="same keys"):
        PadCollator(0)([{"input_ids": [1], "token_type_ids": [0]}])
    with pytest.raises(DataError, match="empty batch"):
        PadCollator(0)([])
    with pytest.raises(DataError, match="side='up'"):
        PadCollator(0, side="up")  # type: ignore[arg-type]


def test_pad_token_falls_back_to_eos(tokenizer, plain_tokenizer) -> None:
    assert plain_tokenizer.pad_token_id is None
    assert resolve_pad_token_id(plain_tokenizer) == plain_tokenizer.eos_token_id
    assert PadCollator.for_tokenizer(plain_tokenizer, side="left") == PadCollator(
        plain_tokenizer.eos_token_id, side="left"
    )
    assert resolve_pad_token_id(tokenizer) == tokenizer.pad_token_id
    no_specials = copy.deepcopy(plain_tokenizer)
    no_specials.eos_token = None
    with pytest.raises(DataError, match="neither a pad nor an EOS token"):
        resolve_pad_token_id(no_specials)
    with pytest.raises(DataError, match="no EOS token and no chat template"):
        end_of_turn_id(no_specials)
