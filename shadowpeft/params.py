"""Parameter counting: measured on modules, and predicted by the formulas of METHOD.md section 5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from shadowpeft.arch import AttentionDims, spec_for
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
    injection ``(L-1) * 2*d*r``; update ``(L-1) * 4*d*g + 2*d``. Each family's layer and stack terms
    are its ArchSpec's (:meth:`~shadowpeft.arch.ArchSpec.layer_parameter_count`,
    :meth:`~shadowpeft.arch.ArchSpec.stack_parameter_count`): GPT-2 blocks are counted from their own
    layout (biased projections, two LayerNorms, learned positions).

    Raises:
        UnsupportedArchitectureError: ``base_config`` has no registered ArchSpec.
    """
    d, big_l = base_config.hidden_size, base_config.num_hidden_layers
    r, g = config.injection.rank, config.update.gate_width
    return ParameterCounts(
        backbone=_backbone_count(base_config, config),
        injection=(big_l - 1) * 2 * d * r,
        update=(big_l - 1) * 4 * d * g + 2 * d,
    )


def _backbone_count(base_config: Any, config: ShadowConfig) -> int:
    spec = spec_for(base_config)
    b, d, n = config.backbone, base_config.hidden_size, config.backbone.num_layers
    m = b.intermediate_size or spec.mlp_width(base_config)
    hs = b.num_attention_heads or base_config.num_attention_heads
    base_kv = getattr(base_config, "num_key_value_heads", None) or base_config.num_attention_heads
    kv = b.num_key_value_heads or (base_kv if b.num_attention_heads is None or hs % base_kv == 0 else hs)
    hd = b.head_dim or getattr(base_config, "head_dim", None) or d // hs  # HF derives it when not stored
    layer = spec.layer_parameter_count(base_config, AttentionDims(hs, kv, hd), mlp_width=m)
    return n * layer + spec.stack_parameter_count(base_config)
