"""Flat-tensor wrappers around a ShadowPEFT causal LM, one per exported graph.

Each wrapper's ``forward`` takes and returns plain tensors in the order that
:mod:`shadowpeft.runtime.contract` declares, builds its layer context from those tensors
(:meth:`shadowpeft.arch.ArchSpec.traced_context`), and calls the same ``shadow_stack`` / ``base_stack``
functions as the PyTorch model, so the graphs cannot drift from the reference implementation.
KV caches cross the graph boundary as tensors ``(B, kv_heads, P, head_dim)``: a ``DynamicCache``
is filled from them inside ``forward`` and read back after the layers have appended to it.

Heads are stored as ``(d, V)`` matrices of their own (:class:`HeadWeight`) so that the ONNX
graph holds them as a MatMul initializer: a head reached through a runtime transpose of the tied
embedding would not be seen as a weight by the quantizers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from shadowpeft.arch import spec_for
from shadowpeft.export.fused_layers import Fusion, fused_view
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.modules import ShadowInjection, ShadowUpdate
from shadowpeft.runtime.contract import StackLayout

__all__ = [
    "CloudBackboneGraph",
    "CoupledGraph",
    "DetachedShadowGraph",
    "HeadGraph",
    "HeadWeight",
    "IndexedInjection",
    "IndexedUpdate",
    "export_view",
    "kv_layout",
]


class HeadWeight(nn.Module):
    """A vocabulary head as ``h @ W_t (+ b)`` with its own ``(d, V)`` copy of the weight."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.weight_t = _frozen(head.weight.t().contiguous())
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else _frozen(bias)

    def forward(self, h: Tensor) -> Tensor:
        logits = h @ self.weight_t  # (B, T, V)
        return logits if self.bias is None else logits + self.bias


class IndexedInjection(nn.Module):
    """The injection with one ``(d, r)`` and one ``(r, d)`` parameter per layer instead of stacked tensors.

    Same math as :class:`~shadowpeft.modules.ShadowInjection` (dropout off). Indexing the stacked
    ``[L-1, d, r]`` parameter would reach each MatMul weight through a Gather, which quantizers and
    constant folding do not see through; separate parameters become plain MatMul initializers.
    ``alpha`` is folded into the up-projection: one Mul fewer per layer, fp32 rounding only.
    """

    def __init__(self, injection: ShadowInjection) -> None:
        super().__init__()
        self.downs = nn.ParameterList(_frozen(w) for w in injection.injection_downs)  # (d, r) each
        self.ups = nn.ParameterList(_frozen(injection.alpha * w) for w in injection.injection_ups)  # (r, d) each

    def forward(self, h: Tensor, s: Tensor, j: int) -> Tensor:
        return h + ((h - s) @ self.downs[j]) @ self.ups[j]


class IndexedUpdate(nn.Module):
    """The update as a graph runs it: ``s + sigmoid(G(u)) * (T(u) - s)`` with ``u = LayerNorm(h)``.

    Same math as :class:`~shadowpeft.modules.ShadowUpdate` (dropout off), written for few graph
    nodes: the two first projections (gate and transform, both ``d -> g`` then SiLU) are one
    ``(d, 2g)`` MatMul weight and one SiLU, split after; and the interpolation is ``s + gamma * (t - s)``
    (``torch.lerp`` traces to a seven-node select between two formulas).
    """

    def __init__(self, update: ShadowUpdate) -> None:
        super().__init__()
        norm = update.hidden_norm
        self.norm_shape, self.eps = norm.normalized_shape, norm.eps
        self.norm_weight, self.norm_bias = _frozen(norm.weight), _frozen(norm.bias)
        self.ins = nn.ParameterList(
            _frozen(torch.cat([gate[0].weight, transform[0].weight]).t())  # (d, 2g)
            for gate, transform in zip(update.update_gates, update.update_transforms, strict=True)
        )
        self.gate_outs = nn.ParameterList(_frozen(gate[2].weight.t()) for gate in update.update_gates)  # (g, d)
        self.transform_outs = nn.ParameterList(_frozen(t[3].weight.t()) for t in update.update_transforms)  # (g, d)

    def forward(self, h: Tensor, s: Tensor, j: int) -> Tensor:
        u = F.layer_norm(h, self.norm_shape, self.norm_weight, self.norm_bias, self.eps)  # (B, T, d)
        gate, transform = F.silu(u @ self.ins[j]).chunk(2, dim=-1)  # (B, T, g) each
        gamma = torch.sigmoid(gate @ self.gate_outs[j])  # (B, T, d)
        return s + gamma * (transform @ self.transform_outs[j] - s)


def _frozen(weight: Tensor) -> nn.Parameter:
    return nn.Parameter(weight.detach().clone(), requires_grad=False)


@contextlib.contextmanager
def export_view(model: ShadowForCausalLM, fusion: Fusion | None = None) -> Iterator[None]:
    """The model as graphs trace it: eager attention, :class:`IndexedInjection` and :class:`IndexedUpdate`;
    restored after.

    With ``fusion``, the stacks it names run fused layers (:mod:`shadowpeft.export.fused_layers`).
    """
    fusion = fusion or Fusion()
    configs = [model.base_backbone.config, model.shadow_model.config]
    attention = [config._attn_implementation for config in configs]
    injection, update = model.shadow_injection_model, model.shadow_update_model
    for config in configs:
        config._attn_implementation = "eager"  # plain MatMul/Softmax ops that every onnxruntime build runs
    model.shadow_injection_model = IndexedInjection(injection)
    model.shadow_update_model = IndexedUpdate(update)
    try:
        with fused_view(model, base="base" in fusion.stacks, shadow="shadow" in fusion.stacks):
            yield
    finally:
        model.shadow_injection_model, model.shadow_update_model = injection, update
        for config, implementation in zip(configs, attention, strict=True):
            config._attn_implementation = implementation


def kv_layout(stack: nn.Module) -> StackLayout:
    """KV layout of a decoder stack (layers, KV heads, head size): its ArchSpec's reading of its config."""
    return StackLayout(*spec_for(stack.config).kv_layout(stack.config))


def _cache(past: Sequence[Tensor]) -> DynamicCache:
    """A cache holding ``past`` = (key_0, value_0, key_1, ...); full-attention layers, no cropping."""
    return DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)])


def _present(cache: DynamicCache, num_layers: int) -> tuple[Tensor, ...]:
    return tuple(t for layer in cache.layers[:num_layers] for t in (layer.keys, layer.values))


class _Graph(nn.Module):
    def __init__(self, model: ShadowForCausalLM) -> None:
        super().__init__()
        self.model = model
        self.shadow_layers = kv_layout(model.shadow_model)[0]
        self.base_layers = model.num_layers

    def _s0(self, input_ids: Tensor, x: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
        m = self.model
        ctx = m.shadow_spec.traced_context(m.shadow_model, x, attention_mask=mask, position_ids=positions)
        return m.shadow_stack(input_ids, x, ctx=ctx, kv=cache)  # (B, T, d)

    def _hidden(self, x: Tensor, s0: Tensor, mask: Tensor, positions: Tensor, cache: DynamicCache) -> Tensor:
        m = self.model
        ctx = m.spec.traced_context(m.base_backbone, x, attention_mask=mask, position_ids=positions)
        return m.base_stack(x, s0, ctx=ctx, kv=cache)  # (B, T, d)


class DetachedShadowGraph(_Graph):
    """``device/shadow``: ids -> shadow logits, ``s0`` and the shadow KV cache (the detached model)."""

    def __init__(self, model: ShadowForCausalLM) -> None:
        super().__init__(model)
        self.head = HeadWeight(model.shadow_head)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        cache = _cache(past)
        x = self.model.embed(input_ids)  # (B, T, d)
        s0 = self._s0(input_ids, x, attention_mask, position_ids, cache)
        return (self.head(s0), s0, *_present(cache, self.shadow_layers))


class HeadGraph(nn.Module):
    """``device/head``: final-normed hidden states -> base logits."""

    def __init__(self, model: ShadowForCausalLM) -> None:
        super().__init__()
        self.head = HeadWeight(model.spec.output_head(model.base))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.head(hidden_states)


class CloudBackboneGraph(_Graph):
    """``cloud/backbone``: ids + ``s0`` -> final-normed hidden and the base KV cache."""

    def forward(self, input_ids: Tensor, shadow_states: Tensor, attention_mask: Tensor, position_ids: Tensor, *past):
        cache = _cache(past)
        x = self.model.embed(input_ids)
        hidden = self._hidden(x, shadow_states, attention_mask, position_ids, cache)
        return (hidden, *_present(cache, self.base_layers))


class CoupledGraph(_Graph):
    """``coupled``: everything in one graph; shadow KV inputs first, then base KV.

    Only the base head runs: the shadow head's logits would cost a second d x V MatMul per token
    that attached decoding never reads (detached decoding uses ``device/shadow``).
    """

    def __init__(self, model: ShadowForCausalLM) -> None:
        super().__init__(model)
        self.head = HeadWeight(model.spec.output_head(model.base))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor):
        split = 2 * self.shadow_layers
        shadow_cache, base_cache = _cache(past[:split]), _cache(past[split:])
        x = self.model.embed(input_ids)
        s0 = self._s0(input_ids, x, attention_mask, position_ids, shadow_cache)
        hidden = self._hidden(x, s0, attention_mask, position_ids, base_cache)
        return (
            self.head(hidden),
            s0,
            *_present(shadow_cache, self.shadow_layers),
            *_present(base_cache, self.base_layers),
        )


def example_past(layout: StackLayout, batch: int, past: int, dtype: torch.dtype) -> list[Tensor]:
    """Random KV tensors ``(B, kv_heads, past, head_dim)`` for every layer (key, value, ...)."""
    layers, kv_heads, head_dim = layout
    return [torch.randn(batch, kv_heads, past, head_dim, dtype=dtype) for _ in range(2 * layers)]
