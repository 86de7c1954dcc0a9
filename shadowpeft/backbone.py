"""Builds the shadow backbone: a fresh, smaller copy of the base (implicit) or a given model (explicit)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from shadowpeft.arch import ArchSpec, spec_for
from shadowpeft.config import BackboneConfig
from shadowpeft.errors import ShadowConfigError


def implicit_shadow_config(base_backbone_config: Any, spec: ArchSpec, cfg: BackboneConfig) -> Any:
    """A copy of the base config describing the implicit shadow stack (no embedding table).

    Raises:
        ShadowConfigError: an override this architecture's config cannot express.
    """
    shadow_config = copy.deepcopy(base_backbone_config)
    spec.shrink_config(shadow_config, num_layers=cfg.num_layers)
    for name in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in spec.overridable:
            raise ShadowConfigError(
                f"backbone.{name}={value!r} cannot be applied to a {shadow_config.model_type!r} shadow; "
                f"overridable here: {', '.join(spec.overridable)}. Leave it unset."
            )
        setattr(shadow_config, spec.config_name(name), value)
    if (
        cfg.num_attention_heads is not None
        and cfg.num_key_value_heads is None
        and "num_key_value_heads" in spec.overridable
    ):
        # Fewer query heads than the base's KV heads would not divide: default to MHA-style KV.
        base_kv = getattr(shadow_config, "num_key_value_heads", None)
        if base_kv is not None and cfg.num_attention_heads % base_kv:
            shadow_config.num_key_value_heads = cfg.num_attention_heads
    # The shadow shares the base token table; a 1-row placeholder avoids allocating a second one.
    shadow_config.vocab_size = 1
    shadow_config.pad_token_id = None
    shadow_config.use_cache = True
    return shadow_config


def build_implicit_backbone(base_backbone: nn.Module, spec: ArchSpec, cfg: BackboneConfig) -> nn.Module:
    """A ``cfg.num_layers``-layer copy of ``base_backbone``'s class, sharing its embeddings.

    Randomly initialised, or, with ``cfg.base_layers``, initialised from those base layers and the
    base's other non-embedding parts (final norm; GPT-2's learned positions) by :func:`copy_base_layers`.
    """
    shadow_config = implicit_shadow_config(base_backbone.config, spec, cfg)
    shadow = type(base_backbone)(shadow_config)
    spec.remove_embedding(shadow)
    ref = spec.embedding(base_backbone).weight
    shadow = shadow.to(device=ref.device, dtype=ref.dtype)
    if cfg.base_layers is not None:
        copy_base_layers(base_backbone, shadow, spec, cfg.base_layers)
    return shadow


@torch.no_grad()
def copy_base_layers(base_backbone: nn.Module, shadow: nn.Module, spec: ArchSpec, layers: tuple[int, ...]) -> None:
    """Load base layer ``layers[j]`` into shadow layer ``j``, and every other part but the token table.

    The other parts are the final norm, rotary tables and, for GPT-2, the learned positions: the
    shadow then computes exactly the base truncated to ``layers`` (the method notes, section 9, lever c).

    Raises:
        ShadowConfigError: an index outside the base's layers.
    """
    base_layers, shadow_layers = spec.layers(base_backbone), spec.layers(shadow)
    bad = [i for i in layers if not 0 <= i < len(base_layers)]
    if bad:
        raise ShadowConfigError(
            f"--shadow-init base:{','.join(map(str, layers))}: layer(s) {bad} out of range; the base has "
            f"{len(base_layers)} decoder layers (indices 0..{len(base_layers) - 1})."
        )
    for j, i in enumerate(layers):
        shadow_layers[j].load_state_dict(base_layers[i].state_dict())
    skip = {spec.layers_attr, spec.embed_attr}
    for name, child in shadow.named_children():
        source = getattr(base_backbone, name, None)
        if name not in skip and isinstance(source, nn.Module):
            child.load_state_dict(source.state_dict())


def explicit_backbone(
    shadow_model: nn.Module, *, share_embeddings: bool, base_hidden: int
) -> tuple[nn.Module, ArchSpec]:
    """The decoder stack of a user-supplied shadow model, optionally without its embedding table.

    Raises:
        ShadowConfigError: embedding sharing asked for with a different hidden size.
    """
    spec = spec_for(shadow_model.config)
    backbone = spec.backbone(shadow_model)
    if share_embeddings:
        if backbone.config.hidden_size != base_hidden:
            raise ShadowConfigError(
                f"share_embeddings=True needs the shadow's hidden size ({backbone.config.hidden_size}) to equal the "
                f"base's ({base_hidden}); set share_embeddings=False to keep the shadow's own embeddings."
            )
        spec.remove_embedding(backbone)
    elif spec.embedding(backbone) is None:
        raise ShadowConfigError(
            "The explicit shadow model has no embedding table; pass share_embeddings=True to feed it the base's."
        )
    return backbone, spec


@torch.no_grad()
def pinv_projection_init(base_head_weight: Tensor, shadow_head_weight: Tensor) -> Tensor:
    """``P = pinv(W_big) @ W_small`` (fp32): the ``Linear(d_s -> d)`` weight minimising ``||W_big P - W_small||_F``.

    Args:
        base_head_weight: The large model's LM head, ``(V, d)``.
        shadow_head_weight: The small model's LM head, ``(V, d_s)``.

    Returns:
        ``(d, d_s)``: the weight of ``nn.Linear(d_s, d, bias=False)``, so that
        ``W_big @ (P @ h_s) ~= W_small @ h_s`` and the wrapped small model starts near its own
        next-token distribution.
    """
    if base_head_weight.shape[0] != shadow_head_weight.shape[0]:
        raise ShadowConfigError(
            f"Vocabulary sizes differ: base head has {base_head_weight.shape[0]} rows, shadow head "
            f"{shadow_head_weight.shape[0]}; a projected shadow must use the base's tokenizer."
        )
    w_big = base_head_weight.float()
    w_small = shadow_head_weight.float()
    return torch.linalg.pinv(w_big) @ w_small  # (d, V) @ (V, d_s)
