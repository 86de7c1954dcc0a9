"""ArchSpec: how to reach and drive one family of Hugging Face decoder stacks, and its facts.

The ShadowPEFT loop (shadowpeft/model.py) needs five things from a base model: its token
embedding, the input stage that turns embeddings into the first hidden state, per-forward layer
context (masks, rotary tables), a way to call one decoder layer, and the final norm. An ArchSpec
supplies them by reaching into the HF modules, without copying per-architecture forward code.

It also holds every other fact about a family that the rest of the package needs, so that no
module outside ``shadowpeft/arch/`` branches on ``model_type``:

* config names: :meth:`ArchSpec.config_name` (GPT-2 spells ``hidden_size`` as ``n_embd``) and the
  family's extra architecture-defining config keys (:attr:`ArchSpec.architecture_keys`, hashed by
  the base fingerprint);
* KV layout: :meth:`ArchSpec.attention_dims` and :meth:`ArchSpec.kv_layout` (exported KV tensors);
* the LM head: :meth:`ArchSpec.output_head`;
* LoRA/DoRA baseline targets: :attr:`ArchSpec.lora_targets` (:class:`AttentionTargets`);
* parameter-count terms: :meth:`ArchSpec.mlp_width`, :meth:`ArchSpec.layer_parameter_count`,
  :meth:`ArchSpec.stack_parameter_count` (METHOD.md section 5);
* traceable masks: :meth:`ArchSpec.traced_context` builds the layer context from explicit tensors
  (:func:`additive_mask`) for ONNX export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

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


class AttentionDims(NamedTuple):
    """Query heads, KV heads and head size of one attention layer."""

    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class AttentionTargets:
    """Where one architecture's attention projections live, and how they are laid out (LoRA/DoRA targets).

    Attributes:
        parent: The attention module inside each decoder layer (``self_attn``, GPT-2's ``attn``).
        projections: The projections adapted inside it: q, k, v, o, or GPT-2's fused qkv and o.
        fused_qkv: One projection computes q, k and v together (GPT-2's ``c_attn``, ``d -> 3d``).
        fan_in_fan_out: Weights are stored ``(in, out)`` (GPT-2's ``Conv1D``), which peft must be told.
    """

    parent: str
    projections: tuple[str, ...]
    fused_qkv: bool = False
    fan_in_fan_out: bool = False

    @property
    def pattern(self) -> str:
        """Regex that peft full-matches against module names.

        It names the parent too: in GPT-2, ``c_proj`` is both the attention output (``attn.c_proj``)
        and the MLP's down projection (``mlp.c_proj``), and only the first may be adapted.
        """
        names = "|".join(re.escape(p) for p in self.projections)
        return rf".*\.{re.escape(self.parent)}\.({names})"

    def projection_shapes(self, hidden: int, dims: AttentionDims) -> tuple[tuple[int, int], ...]:
        """``(in, out)`` of each adapted projection in one layer, in :attr:`projections` order."""
        q, k = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
        if self.fused_qkv:
            return ((hidden, q + 2 * k), (q, hidden))
        return ((hidden, q), (hidden, k), (hidden, k), (q, hidden))


QKVO = AttentionTargets(parent="self_attn", projections=("q_proj", "k_proj", "v_proj", "o_proj"))


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
        config_names: ``(field, name)``: the config key this family stores a standard field under,
            where it names it differently (GPT-2's ``n_embd`` for ``hidden_size``).
        architecture_keys: Architecture-defining config keys of this family beyond the common HF
            ones (:data:`shadowpeft.checkpoint.fingerprint.COMMON_ARCHITECTURE_KEYS`).
        lora_targets: The attention projections LoRA/DoRA baselines adapt; ``None``: no baselines.
        qk_norm: Attention has q and k RMSNorms of ``head_dim`` each (Qwen3), for parameter counts.
        qkv_bias: q, k and v projections always carry a bias (Qwen2), whatever ``attention_bias`` says.
    """

    model_types: tuple[str, ...]
    backbone_attr: str = "model"
    layers_attr: str = "layers"
    embed_attr: str = "embed_tokens"
    norm_attr: str = "norm"
    sliding_from_window: bool = False
    overridable: tuple[str, ...] = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    config_names: tuple[tuple[str, str], ...] = ()
    architecture_keys: tuple[str, ...] = ()
    lora_targets: AttentionTargets | None = QKVO
    qk_norm: bool = False
    qkv_bias: bool = False

    def config_name(self, field: str) -> str:
        """The key under which this family's config stores ``field`` (e.g. ``hidden_size``)."""
        return dict(self.config_names).get(field, field)

    # ---------------------------------------------------------------- shapes and parameter counts

    def attention_dims(self, config: Any) -> AttentionDims:
        """Heads, KV heads and head size of a config, with HF's defaults for the ones it omits."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # HF derives it when not stored
        return AttentionDims(heads, kv_heads, head_dim)

    def kv_layout(self, config: Any) -> tuple[int, int, int]:
        """``(layers, kv_heads, head_dim)`` of the KV cache of a stack: each layer's key and value are
        ``(B, kv_heads, P, head_dim)``."""
        dims = self.attention_dims(config)
        return config.num_hidden_layers, dims.kv_heads, dims.head_dim

    def mlp_width(self, config: Any) -> int:
        """Inner width of the MLP."""
        return config.intermediate_size

    def layer_parameter_count(self, config: Any, dims: AttentionDims, *, mlp_width: int) -> int:
        """Parameters of one decoder layer of width ``config.hidden_size`` with ``dims`` and ``mlp_width``.

        Llama-style: ``d*hs*hd + 2*d*kv*hd + hs*hd*d + 3*d*m + 2*d`` (+ ``2*hd`` for q/k norms,
        + ``hs*hd + 2*kv*hd`` for q/k/v biases).
        """
        d, (hs, kv, hd), m = config.hidden_size, dims, mlp_width
        count = d * hs * hd + 2 * d * kv * hd + hs * hd * d + 3 * d * m + 2 * d
        if self.qk_norm:
            count += 2 * hd
        if self.qkv_bias or getattr(config, "attention_bias", False):
            count += hs * hd + 2 * kv * hd
        return count

    def stack_parameter_count(self, config: Any) -> int:
        """Parameters of a stack outside its layers and token embedding (the final norm here)."""
        return config.hidden_size

    def output_head(self, model: nn.Module) -> nn.Module | None:
        """The LM head of a task model (``None`` for a sequence classifier)."""
        return model.get_output_embeddings()

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
        return LayerContext(masks, types, position_ids, _rotary(backbone, h, position_ids), use_cache)

    def sliding_window(self, config: Any) -> int | None:
        """Window of this stack's sliding-attention layers."""
        return getattr(config, "sliding_window", None)

    def traced_context(
        self, backbone: nn.Module, x: Tensor, *, attention_mask: Tensor, position_ids: Tensor
    ) -> LayerContext:
        """A :class:`LayerContext` for ``backbone`` over new tokens ``x`` (B, T, d), masks from tensors.

        The HF mask helpers of :meth:`context` read a live ``Cache`` and take data-dependent
        shortcuts that do not trace into a graph with dynamic shapes; an exported graph receives
        ``attention_mask`` (B, P+T) as an input instead, and :func:`additive_mask` builds the same
        masks from it with plain tensor ops.

        Args:
            backbone: The decoder stack (its ``config`` and ``rotary_emb``).
            x: Embeddings of the new tokens; only their shape, dtype and device are read.
            attention_mask: (B, P+T) int mask of past and new tokens.
            position_ids: (B, T) positions of the new tokens.
        """
        config: Any = backbone.config
        types = self.layer_types(config)
        new_tokens = x.shape[1]
        masks: dict[str, Any] = {}
        for kind in dict.fromkeys(types):
            window = self.sliding_window(config) if kind == SLIDING else None
            masks[kind] = additive_mask(attention_mask, new_tokens, x.dtype, window=window)
        return LayerContext(masks, types, position_ids, _rotary(backbone, x, position_ids), True)

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


def _rotary(backbone: nn.Module, h: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor] | None:
    rotary = getattr(backbone, "rotary_emb", None)
    return rotary(h, position_ids=position_ids) if rotary is not None else None


def additive_mask(attention_mask: Tensor, new_tokens: int, dtype: torch.dtype, *, window: int | None = None) -> Tensor:
    """The (B, 1, T, P+T) float mask: 0 where attention is allowed, the dtype's minimum elsewhere.

    A new token at cache index ``q = P + i`` sees key ``k`` when ``k <= q``, the key is not padding,
    and, for sliding-window layers, ``k > q - window``: the semantics of the HF mask helpers.

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


def default_position_ids(batch: int, length: int, past: int, device: torch.device) -> Tensor:
    """``(B, T)`` positions ``past .. past+T-1``, as HF models use when none are given."""
    return torch.arange(past, past + length, device=device).unsqueeze(0).expand(batch, -1)
