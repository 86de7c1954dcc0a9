"""Layer contexts built from explicit tensors, for tracing graphs to ONNX.

The PyTorch model builds its masks with the Hugging Face mask helpers, which read a live
``Cache`` object and take data-dependent shortcuts that do not trace into a graph with dynamic
shapes. A graph instead receives ``attention_mask`` (B, P+T) as an input, so the 4D additive mask
is computed here with plain tensor ops, with the same semantics: a new token at cache index
``q = P + i`` sees key ``k`` when ``k <= q``, the key is not padding, and, for sliding-window
layers, ``k > q - window``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shadowpeft.arch import ArchSpec, LayerContext
from shadowpeft.arch.base import SLIDING

__all__ = ["additive_mask", "explicit_context"]


def additive_mask(attention_mask: Tensor, new_tokens: int, dtype: torch.dtype, *, window: int | None = None) -> Tensor:
    """The (B, 1, T, P+T) float mask: 0 where attention is allowed, the dtype's minimum elsewhere.

    Args:
        attention_mask: (B, P+T) with 1 for real tokens and 0 for padding, past and new.
        new_tokens: ``T``, the number of new tokens (queries).
        dtype: Float type of the attention scores.
        window: Sliding-window size, or ``None`` for full causal attention.
    """
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)  # (P+T,)
    queries = keys[total - new_tokens :].unsqueeze(-1)  # (T, 1): cache index of each new token
    allowed = keys.unsqueeze(0) <= queries  # (T, P+T)
    if window is not None:
        allowed = allowed & (keys.unsqueeze(0) > queries - window)
    allowed = allowed.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, T, P+T)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked).unsqueeze(1)


def explicit_context(
    spec: ArchSpec, backbone: nn.Module, x: Tensor, *, attention_mask: Tensor, position_ids: Tensor
) -> LayerContext:
    """A :class:`LayerContext` for ``backbone`` over new tokens ``x`` (B, T, d), masks from tensors.

    Args:
        spec: The stack's architecture spec (layer types).
        backbone: The decoder stack (its ``config`` and ``rotary_emb``).
        x: Embeddings of the new tokens; only their shape, dtype and device are read.
        attention_mask: (B, P+T) int mask of past and new tokens.
        position_ids: (B, T) positions of the new tokens.
    """
    config: Any = backbone.config
    types = spec.layer_types(config)
    new_tokens = x.shape[1]
    masks: dict[str, Any] = {}
    for kind in dict.fromkeys(types):
        window = getattr(config, "sliding_window", None) if kind == SLIDING else None
        masks[kind] = additive_mask(attention_mask, new_tokens, x.dtype, window=window)
    rotary = getattr(backbone, "rotary_emb", None)
    position_embeddings = rotary(x, position_ids=position_ids) if rotary is not None else None
    return LayerContext(masks, types, position_ids, position_embeddings, True)
