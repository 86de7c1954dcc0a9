"""GPT-2 style stacks: ``transformer.h`` blocks, learned positions added in the input stage.

The config spells its sizes ``n_embd``, ``n_layer``, ``n_head``, ``n_inner``, ``n_positions``; q, k
and v come from one fused ``Conv1D`` (``c_attn``, weights stored ``(in, out)``); every projection
and LayerNorm has a bias.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from shadowpeft.arch.base import ArchSpec, AttentionDims, AttentionTargets, LayerContext


class GPT2Spec(ArchSpec):
    """Learned absolute positions (``wpe``), positional-argument blocks, biased projections."""

    def mlp_width(self, config: Any) -> int:
        return config.n_inner or 4 * config.hidden_size  # HF's default when n_inner is None

    def layer_parameter_count(self, config: Any, dims: AttentionDims, *, mlp_width: int) -> int:
        # ln_1, c_attn (d -> 3d), c_proj, ln_2, mlp c_fc, mlp c_proj. The head count only reshapes
        # c_attn; it does not change its size.
        d, m = config.hidden_size, mlp_width
        return 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)

    def stack_parameter_count(self, config: Any) -> int:
        return 2 * config.hidden_size + config.n_positions * config.hidden_size  # ln_f and wpe

    def input_stage(self, backbone: nn.Module, x: Tensor, position_ids: Tensor) -> Tensor:
        # The implicit shadow keeps its own ``wpe``: only the token table is shared (x = wte(ids)).
        return backbone.drop(x + backbone.wpe(position_ids))

    def call_layer(self, layer: nn.Module, h: Tensor, ctx: LayerContext, idx: int, cache: Any) -> Tensor:
        return layer(
            h,
            cache,
            ctx.masks[ctx.layer_types[idx]],
            use_cache=ctx.use_cache,
            position_ids=ctx.position_ids,
        )


GPT2 = GPT2Spec(
    model_types=("gpt2",),
    backbone_attr="transformer",
    layers_attr="h",
    embed_attr="wte",
    norm_attr="ln_f",
    overridable=("intermediate_size", "num_attention_heads"),
    config_names=(
        ("hidden_size", "n_embd"),
        ("num_hidden_layers", "n_layer"),
        ("num_attention_heads", "n_head"),
        ("intermediate_size", "n_inner"),
        ("max_position_embeddings", "n_positions"),
    ),
    architecture_keys=(
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "activation_function",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
    ),
    # c_attn is the fused qkv Conv1D; naming the parent keeps the MLP's own c_proj out.
    lora_targets=AttentionTargets(
        parent="attn", projections=("c_attn", "c_proj"), fused_qkv=True, fan_in_fan_out=True
    ),
)

SPECS = (GPT2,)
