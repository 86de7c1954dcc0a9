"""GPT-2 style stacks: ``transformer.h`` blocks, learned positions added in the input stage."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from shadowpeft.arch.base import ArchSpec, LayerContext


class GPT2Spec(ArchSpec):
    """Learned absolute positions (``wpe``) and positional-argument blocks."""

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
    config_names=(("intermediate_size", "n_inner"),),
)
