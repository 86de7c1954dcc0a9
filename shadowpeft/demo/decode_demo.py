"""The decode demo (`shadowpeft decode-demo`): wrap SmolLM2-135M-Instruct with a shadow and decode.

Loads the real model, wraps it with a ShadowPEFT adapter, reports parameter counts, and
generates text attached and detached with the KV cache, timing prefill and per-token decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from shadowpeft.config import ShadowConfig
from shadowpeft.heads import ShadowForCausalLM, get_shadow_model
from shadowpeft.model import Mode
from shadowpeft.params import count_parameters

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


@dataclass
class ModeRun:
    """One timed generation."""

    mode: Mode
    text: str
    new_tokens: int
    prefill_ms: float
    ms_per_token: float


@dataclass
class DemoReport:
    trainable_params: int
    total_params: int
    base_params: int
    runs: list[ModeRun] = field(default_factory=list)


def build_chat_prompt(tokenizer: object, prompt: str) -> str:
    """Apply the tokenizer's chat template when it has one (SmolLM2 uses ChatML)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.inference_mode()
def timed_generation(
    model: ShadowForCausalLM, tokenizer: object, prompt: str, *, mode: Mode, max_new_tokens: int
) -> ModeRun:
    """Greedy cached generation; per-token time = (total - prefill) / (tokens - 1).

    The prefill is timed as its own forward (prompt into an empty cache, logits of the last
    position only), which is what ``generate`` does before its first sampled token.
    """
    enc = tokenizer(build_chat_prompt(tokenizer, prompt), return_tensors="pt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.generate(**enc, max_new_tokens=2, do_sample=False, mode=mode, pad_token_id=pad)  # warm-up, untimed
    start = time.perf_counter()
    model(
        enc.input_ids,
        attention_mask=enc.attention_mask,
        past_key_values=model.new_cache(),
        use_cache=True,
        logits_to_keep=1,
        mode=mode,
    )
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, mode=mode, pad_token_id=pad)
    total = time.perf_counter() - start
    new = out[0, enc.input_ids.shape[1] :]
    per_token = (total - prefill) / max(len(new) - 1, 1)
    text = tokenizer.decode(new, skip_special_tokens=False)
    return ModeRun(mode, text, len(new), prefill * 1e3, per_token * 1e3)


def run_demo(
    base: nn.Module,
    tokenizer: object,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    config: ShadowConfig | None = None,
    seed: int = 0,
) -> DemoReport:
    """Wrap ``base`` (frozen, in place) with a fresh shadow and generate attached and detached."""
    torch.manual_seed(seed)
    base_params = count_parameters(base)[1]
    model = get_shadow_model(base, config or ShadowConfig()).eval()
    trainable, total = count_parameters(model)
    report = DemoReport(trainable, total, base_params)
    for mode in ("attached", "detached"):
        logger.info("generating %d tokens, %s", max_new_tokens, mode)
        report.runs.append(timed_generation(model, tokenizer, prompt, mode=mode, max_new_tokens=max_new_tokens))
    return report
