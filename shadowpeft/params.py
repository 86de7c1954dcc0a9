"""Parameter counting: measured on modules, and predicted by the formulas of METHOD.md section 5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from shadowpeft.config import ShadowConfig


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` over unique parameters (tied weights count once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


@dataclass(frozen=True)
class ParameterCounts:
    """Predicted trainable parameters of an implicit-shadow adapter, by part."""

    backbone: int
    injection: int
    update: int

    @property
    def total(self) -> int:
        return self.backbone + self.injection + self.update


def expected_parameter_counts(base_config: Any, config: ShadowConfig) -> ParameterCounts:
    """METHOD.md section 5 for an implicit shadow on ``base_config``.

    Llama-style layer: ``d*hs*hd + 2*d*kv*hd + hs*hd*d + 3*d*m + 2*d`` (+ ``2*hd`` for Qwen3's
    q/k norms, + ``hs*hd + 2*kv*hd`` for Qwen2's q/k/v biases); backbone ``n * layer + d``;
    injection ``(L-1) * 2*d*r``; update ``(L-1) * 4*d*g + 2*d``. GPT-2 blocks are counted from their
    own layout (biased projections, two LayerNorms, learned positions).
    """
    d, big_l = base_config.hidden_size, base_config.num_hidden_layers
    r, g = config.injection.rank, config.update.gate_width
    return ParameterCounts(
        backbone=_backbone_count(base_config, config),
        injection=(big_l - 1) * 2 * d * r,
        update=(big_l - 1) * 4 * d * g + 2 * d,
    )


def _backbone_count(base_config: Any, config: ShadowConfig) -> int:
    b, d, n = config.backbone, base_config.hidden_size, config.backbone.num_layers
    m = b.intermediate_size or _mlp_width(base_config)
    if base_config.model_type == "gpt2":
        # GPT-2's head count only reshapes c_attn; it does not change its size.
        block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
        return n * block + 2 * d + base_config.n_positions * d
    hs = b.num_attention_heads or base_config.num_attention_heads
    base_kv = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    kv = b.num_key_value_heads or (base_kv if b.num_attention_heads is None or hs % base_kv == 0 else hs)
    hd = b.head_dim or getattr(base_config, "head_dim", None) or d // hs  # HF derives it when not stored
    layer = d * hs * hd + 2 * d * kv * hd + hs * hd * d + 3 * d * m + 2 * d
    if base_config.model_type == "qwen3":
        layer += 2 * hd
    if base_config.model_type == "qwen2" or getattr(base_config, "attention_bias", False):
        layer += hs * hd + 2 * kv * hd
    return n * layer + d


def _mlp_width(base_config: Any) -> int:
    return (
        getattr(base_config, "intermediate_size", None)
        or getattr(base_config, "n_inner", None)
        or (4 * base_config.hidden_size)
    )
