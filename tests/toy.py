"""A tiny word-level tokenizer and Llama base saved to disk: a local ``--base`` directory for CLI tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

COLORS = ("red", "blue", "green")
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def toy_words() -> list[str]:
    return ["repeat", "the", "color", "sample", "is", ":", *COLORS, *(str(i) for i in range(200))]


def save_toy_base(directory: Path, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """Write a 3-layer random Llama (hidden 32, 4 heads) and its word-level tokenizer to ``directory``.

    ``hidden_size=64`` gives heads of 16, the least that onnxruntime-genai's GroupQueryAttention runs.
    """
    vocab = {token: i for i, token in enumerate([*SPECIALS, *toy_words()])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=True,
        initializer_range=0.5,
    )  # a frozen head with range enough to be steered
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_toy_data(directory: Path, *, rows: int = 150, seed: int = 0) -> dict[str, Path]:
    """Learnable toy tasks: echo a color (generation), name the color (classification), color text (LM)."""
    rng = random.Random(seed)
    files = {kind: directory / f"{kind}.jsonl" for kind in ("generation", "classification", "lm")}
    with files["generation"].open("w") as gen, files["classification"].open("w") as cls, files["lm"].open("w") as lm:
        for i in range(rows):
            color = rng.choice(COLORS)
            gen.write(json.dumps({"prompt": f"repeat the color : {color} {i}", "completion": color}) + "\n")
            cls.write(json.dumps({"text": f"sample {i} is {color}", "label": color}) + "\n")
            lm.write(json.dumps({"text": f"the color is {color} {color} {color} {i}"}) + "\n")
    return files
