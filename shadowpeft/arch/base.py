"""ArchSpec: how to reach and drive one family of Hugging Face decoder stacks.

The ShadowPEFT loop (shadowpeft/model.py) needs five things from a base model: its token
embedding, the input stage that turns embeddings into the first hidden state, per-forward layer
context (masks, rotary tables), a way to call one decoder layer, and the final norm. An ArchSpec
supplies them by reaching into the HF modules, without copying per-architecture forward code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

FULL = "full_attention"
SLIDING = "sliding_attention"

_MASK_BUILDERS = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


@dataclass(frozen=True)
class LayerContext:
    """Everything a decoder layer needs besides ``h`` and the cache; built once per forward.

    Attributes:
        masks: Attention mask per layer type (``full_attention`` / ``sliding_attention``).
        layer_types: The attention type of each layer of this stack.
        position_ids: ``(B, T)`` positions of the new tokens.
        position_embeddings: Rotary ``(cos, sin)`` or ``None`` for learned positions.
        use_cache: Whether layers append to the KV cache.
    """

    masks: dict[str, Any]
    layer_types: tuple[str, ...]
    position_ids: Tensor
    position_embeddings: tuple[Tensor, Tensor] | None
    use_cache: bool


@dataclass(frozen=True)
class ArchSpec:
    """Accessors for one architecture family (defaults fit Llama-style ``model.layers`` stacks).

    Attributes:
        model_types: HF ``config.model_type`` values this spec serves.
        backbone_attr: Attribute of the task model holding the decoder stack.
        layers_attr: Attribute of the backbone holding the ``nn.ModuleList`` of layers.
        embed_attr: Attribute of the backbone holding the token embedding.
        norm_attr: Attribute of the backbone holding the final norm.
        sliding_from_window: Without ``config.layer_types``, every layer uses a sliding window
            when ``config.sliding_window`` is set (Mistral).
        overridable: Implicit-shadow overrides this family's config supports.
        config_names: Config attribute for an override, where the family names it differently.
    """

    model_types: tuple[str, ...]
    backbone_attr: str = "model"
    layers_attr: str = "layers"
    embed_attr: str = "embed_tokens"
    norm_attr: str = "norm"
    sliding_from_window: bool = False
    overridable: tuple[str, ...] = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    config_names: tuple[tuple[str, str], ...] = ()

    def config_name(self, field: str) -> str:
        return dict(self.config_names).get(field, field)

    def backbone(self, model: nn.Module) -> nn.Module:
        """The decoder stack of a task model (``XForCausalLM.model``), or ``model`` if it is one."""
        if isinstance(getattr(model, self.layers_attr, None), nn.ModuleList):
            return model
        return getattr(model, self.backbone_attr)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return getattr(backbone, self.layers_attr)

    def embedding(self, backbone: nn.Module) -> nn.Module | None:
        return getattr(backbone, self.embed_attr, None)

    def remove_embedding(self, backbone: nn.Module) -> None:
        setattr(backbone, self.embed_attr, None)

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return getattr(backbone, self.norm_attr)

    def input_stage(self, backbone: nn.Module, x: Tensor, position_ids: Tensor) -> Tensor:
        """Turn token embeddings into the first hidden state (identity for rotary models)."""
        return x

    def layer_types(self, config: Any) -> tuple[str, ...]:
        n = config.num_hidden_layers
        types = getattr(config, "layer_types", None)
        if types:
            return tuple(types[:n])
        sliding = self.sliding_from_window and getattr(config, "sliding_window", None) is not None
        return (SLIDING if sliding else FULL,) * n

    def context(
        self,
        backbone: nn.Module,
        h: Tensor,
        *,
        attention_mask: Tensor | None,
        position_ids: Tensor,
        cache: Any,
        use_cache: bool,
    ) -> LayerContext:
        """Build masks and rotary tables for one forward of this stack over the new tokens ``h``."""
        config = backbone.config
        types = self.layer_types(config)
        masks = {
            kind: _MASK_BUILDERS[kind](
                config=config,
                inputs_embeds=h,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_ids=position_ids,
            )
            for kind in dict.fromkeys(types)
        }
        rotary = getattr(backbone, "rotary_emb", None)
        position_embeddings = rotary(h, position_ids=position_ids) if rotary is not None else None
        return LayerContext(masks, types, position_ids, position_embeddings, use_cache)

    def call_layer(self, layer: nn.Module, h: Tensor, ctx: LayerContext, idx: int, cache: Any) -> Tensor:
        """Run decoder layer ``idx`` on ``h`` (B, T, d); appends to ``cache`` when ``ctx.use_cache``."""
        return layer(
            h,
            attention_mask=ctx.masks[ctx.layer_types[idx]],
            position_embeddings=ctx.position_embeddings,
            position_ids=ctx.position_ids,
            past_key_values=cache,
            use_cache=ctx.use_cache,
        )

    def shrink_config(self, config: Any, *, num_layers: int) -> None:
        """Edit a copied config in place to describe a ``num_layers`` stack."""
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[:num_layers])
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = min(config.max_window_layers, num_layers)


def default_position_ids(batch: int, length: int, past: int, device: torch.device) -> Tensor:
    """``(B, T)`` positions ``past .. past+T-1``, as HF models use when none are given."""
    return torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, -1)
