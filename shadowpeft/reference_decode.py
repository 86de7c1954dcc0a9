"""Reference decode loop: the ground truth the ONNX runtime is checked against.

Deliberately plain: prefill the prompt, then feed one token per step through the same
``forward`` with a :class:`~shadowpeft.cache.ShadowCache`. Greedy only; sampling lives in HF
``generate`` (for PyTorch) and in the runtime (for ONNX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.model import Mode


@dataclass
class GreedyResult:
    tokens: Tensor  # (B, N) generated ids
    logits: Tensor  # (B, N, V) logits each token was chosen from


@torch.inference_mode()
def greedy_decode(
    model: ShadowForCausalLM,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 16,
    mode: Mode = "attached",
) -> GreedyResult:
    """Greedy decode with KV caches; positions follow the attention mask (left padding works).

    Args:
        model: The wrapped causal LM (eval mode for deterministic output).
        input_ids: (B, T) prompts, left-padded.
        attention_mask: (B, T), 1 for real tokens.
        max_new_tokens: Tokens to generate (no early stop: parity tests compare fixed lengths).
        mode: ``attached`` or ``detached``.
    """
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache()
    step_ids, step_pos = input_ids, positions
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        out = model(
            step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            mode=mode,
        )
        last = out.logits[:, -1].float()  # (B, V)
        nxt = last.argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        logits.append(last)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
        step_ids, step_pos = nxt, step_pos[:, -1:] + 1
    return GreedyResult(torch.cat(tokens, dim=-1), torch.stack(logits, dim=1))
