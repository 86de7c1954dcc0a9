"""Shared fixtures: tiny seeded models of every supported architecture (no network)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from shadowpeft import ShadowConfig, get_shadow_model
from tests.modes import UMASKS, set_umask

# One torch thread per xdist worker: two workers x two OpenMP threads on two cores spin against
# each other and run up to 100x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# Three layers at least: layer 0 is not injected and the last update has no consumer.
ARCH_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=5),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16),
    "gpt2": lambda: GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_inner=128,
        n_positions=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
}
ARCHS = sorted(ARCH_CONFIGS)


def tiny_base(arch: str, *, seed: int = 0, task: str = "causal-lm", num_labels: int = 3) -> torch.nn.Module:
    """A seeded random HF model of ``arch`` in eval mode (sdpa attention)."""
    torch.manual_seed(seed)
    config = ARCH_CONFIGS[arch]()
    config._attn_implementation = "sdpa"
    if task == "causal-lm":
        return AutoModelForCausalLM.from_config(config).eval()
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config).eval()


def no_dropout_config(**overrides: object) -> ShadowConfig:
    """Default ShadowConfig with every dropout at 0, for exact comparisons."""
    from shadowpeft.config import InjectionConfig, UpdateConfig

    return ShadowConfig(injection=InjectionConfig(dropout=0.0), update=UpdateConfig(dropout=0.0), **overrides)


@torch.no_grad()
def perturb(model: torch.nn.Module, *, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Move every shadow parameter off its init (``W_up = 0`` makes the adapter an identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("shadow_"):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def perturbed(arch: str) -> torch.nn.Module:
    """A wrapped tiny causal LM of ``arch`` whose adapter is not the identity, in eval mode."""
    return perturb(get_shadow_model(tiny_base(arch), no_dropout_config())).eval()


def padded_batch(lengths: tuple[int, ...] = (9, 5), *, vocab: int = 128, seed: int = 3, side: str = "left"):
    """Random prompts of different lengths, padded to one width; returns (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, vocab, (n,), generator=g)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = tokens
        mask[row, cols] = 1
    return ids, mask


def qwen3_0_6b_config() -> Qwen3Config:
    """Qwen3-0.6B's architecture (config only, no weights)."""
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
    )


@pytest.fixture(params=UMASKS, ids=lambda mask: f"umask{mask:03o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Runs the test under umask 022 and under 077 (restored afterwards); yields the mask."""
    previous = set_umask(request.param)
    try:
        yield request.param
    finally:
        set_umask(previous)
