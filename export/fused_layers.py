"""Decoder layers written with onnxruntime's fused operators, for export (``shadow-export --ops``).

A Llama-style layer (RMSNorm, q/k/v/o attention with rotary positions, gated SiLU MLP; Llama,
Mistral, Qwen2, Qwen3 and their relatives) is written as

    SimplifiedLayerNormalization -> one q/k/v MatMul -> RotaryEmbedding (q, k)
    -> GroupQueryAttention (appends to the KV cache) -> o MatMul
    -> SkipSimplifiedLayerNormalization (residual add + norm) -> MLP -> Add

(:mod:`shadowpeft.export.fused_ops`), instead of the ~40 small operators the standard graph
traces. The shadow injections and updates between layers are not part of it: they stay plain
MatMuls that the quantizers see (:mod:`shadowpeft.export.graphs` writes them for both kinds of
graph). The q, k and v weights become one ``(d, q + 2k)`` initializer, so a quantized graph has
one MatMulNBits for all three.

Whether a stack can be fused is decided by :func:`fusion_blocker`, which checks the modules'
structure and then runs one fused layer against the Hugging Face layer on random inputs: a family
whose norm, activation or attention differ (Gemma's ``1 + w`` norm, soft-capping, GPT-2's
LayerNorm) is reported with a reason and keeps the standard graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from shadowpeft.arch import ArchSpec, LayerContext
from shadowpeft.export import fused_ops
from shadowpeft.export.errors import ExportError
from shadowpeft.heads import ShadowForCausalLM
from shadowpeft.runtime.contract import CLOUD_BACKBONE, COUPLED, DEVICE_HEAD, DEVICE_SHADOW, STACKS

__all__ = ["GRAPH_STACKS", "OPS", "Fusion", "FusedStack", "fused_view", "fusion_blocker", "plan_fusion"]

#: ``--ops`` choices: fused where a stack allows it, fused or fail, standard ONNX operators only.
OPS = ("auto", "fused", "standard")
#: The decoder stacks each graph runs.
GRAPH_STACKS = {DEVICE_SHADOW: ("shadow",), DEVICE_HEAD: (), CLOUD_BACKBONE: ("base",), COUPLED: STACKS}

#: Rotary scalings whose values for a position do not depend on the sequence length (a traced graph
#: would freeze a length-dependent one at the tracing example's length).
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: Fused vs HF layer on random inputs, relative to the layer's largest output (fp32 rounding is ~1e-7 of it;
#: a different norm or activation is off by whole units).
_CHECK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Fusion:
    """Which decoder stacks an export writes with fused layers, and why the others are standard.

    Attributes:
        stacks: Fused stacks, from :data:`STACKS`.
        reasons: For each standard stack, why (one line).
    """

    stacks: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)

    def in_graph(self, key: str) -> tuple[str, ...]:
        """The fused stacks among those graph ``key`` runs (its manifest ``fused``)."""
        return tuple(stack for stack in GRAPH_STACKS[key] if stack in self.stacks)

    def describe(self) -> str:
        """One line for the progress display: what is fused, and why the rest is not."""
        parts = [f"{stack} stack fused" for stack in self.stacks]
        parts += [f"{stack} stack standard ({why})" for stack, why in self.reasons.items()]
        return "; ".join(parts)


def plan_fusion(model: ShadowForCausalLM, ops: str) -> Fusion:
    """The :class:`Fusion` for ``shadow-export --ops ops``.

    Raises:
        ExportError: ``ops`` is unknown, or ``fused`` was asked for a stack that cannot be fused.
    """
    if ops not in OPS:
        raise ExportError(f"--ops {ops!r} is not one of {', '.join(OPS)}.")
    if ops == "standard":
        return Fusion((), dict.fromkeys(STACKS, "--ops standard"))
    stacks, reasons = [], {}
    for name, stack, spec in (
        ("shadow", model.shadow_model, model.shadow_spec),
        ("base", model.base_backbone, model.spec),
    ):
        why = fusion_blocker(stack, spec)
        if why is None:
            stacks.append(name)
        else:
            reasons[name] = why
    if ops == "fused" and reasons:
        listed = "; ".join(f"the {name} stack: {why}" for name, why in reasons.items())
        raise ExportError(f"--ops fused: cannot fuse {listed}. Use --ops auto (fuses what it can) or --ops standard.")
    return Fusion(tuple(stacks), reasons)


def _norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if eps is not None else None


class StepInputs(NamedTuple):
    """What every fused layer of a stack reads besides ``h`` and its cache; built once per forward.

    Attributes:
        mask: (B, 1, T, P+T) additive mask.
        seqlens_k, total: :func:`~shadowpeft.export.fused_ops.lengths` of ``mask``.
        cos, sin: (B*T, head_dim/2) rotary values of the new tokens (the stack's own rotary module's,
            one half of its rotate-half layout), so no position has to fit a precomputed table.
        rows: (B, T) each new token's row in ``cos``/``sin``.
    """

    mask: Tensor
    seqlens_k: Tensor
    total: Tensor
    cos: Tensor
    sin: Tensor
    rows: Tensor


def step_inputs(ctx: LayerContext, kind: str) -> StepInputs:
    """:class:`StepInputs` for the layers of attention type ``kind`` from a traced layer context."""
    mask = ctx.masks[kind]
    cos, sin = ctx.position_embeddings  # (B, T, head_dim), halves equal
    b, t, width = cos.shape
    half = width // 2
    rows = torch.arange(b * t, device=cos.device).reshape(b, t)
    return StepInputs(
        mask,
        *fused_ops.lengths(mask),
        cos[..., :half].reshape(b * t, half),
        sin[..., :half].reshape(b * t, half),
        rows,
    )


class FusedLayer(nn.Module):
    """One decoder layer: ``(h, step inputs, past k, past v) -> (h, present k, present v)``."""

    def __init__(self, layer: nn.Module, dims: tuple[int, int, int]) -> None:
        super().__init__()
        attn = layer.self_attn
        self.heads, self.kv_heads, self.head_dim = dims
        self.scale = float(attn.scaling)
        self.input_norm = _frozen(layer.input_layernorm.weight)
        self.input_eps = _norm_eps(layer.input_layernorm)
        self.post_norm = _frozen(layer.post_attention_layernorm.weight)
        self.post_eps = _norm_eps(layer.post_attention_layernorm)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_weight = _frozen(torch.cat([p.weight for p in projections]).t().contiguous())  # (d, q+2k)
        biases = [p.bias if p.bias is not None else torch.zeros(p.out_features) for p in projections]
        has_bias = any(p.bias is not None for p in projections)
        self.qkv_bias = _frozen(torch.cat(biases)) if has_bias else None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = None if q_norm is None else _frozen(q_norm.weight)
        self.k_norm = None if k_norm is None else _frozen(k_norm.weight)
        self.qk_eps = _norm_eps(q_norm) if q_norm is not None else None
        self.o_proj = attn.o_proj
        self.mlp = layer.mlp

    def forward(self, h: Tensor, step: StepInputs, past_k: Tensor, past_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, T, d), past (B, kv_heads, P, head_dim) -> h, present (B, kv_heads, P+T, head_dim)."""
        b, t, _ = h.shape
        q_width, k_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        x = fused_ops.rms_norm(h, self.input_norm, self.input_eps)
        qkv = x @ self.qkv_weight if self.qkv_bias is None else x @ self.qkv_weight + self.qkv_bias
        q, k, v = qkv.split((q_width, k_width, k_width), dim=-1)
        if self.q_norm is not None:
            q = fused_ops.rms_norm(q.reshape(b, t, self.heads, self.head_dim), self.q_norm, self.qk_eps)
            k = fused_ops.rms_norm(k.reshape(b, t, self.kv_heads, self.head_dim), self.k_norm, self.qk_eps)
            q, k = q.reshape(b, t, q_width), k.reshape(b, t, k_width)
        q = fused_ops.rotary(q, step.rows, step.cos, step.sin, self.heads)
        k = fused_ops.rotary(k, step.rows, step.cos, step.sin, self.kv_heads)
        out, present_k, present_v = fused_ops.gqa(
            q, k, v.contiguous(), past_k, past_v, step.seqlens_k, step.total, step.mask, self.heads, self.kv_heads,
            self.scale,
        )  # fmt: skip
        normed, h = fused_ops.skip_rms_norm(self.o_proj(out), h, self.post_norm, self.post_eps)
        return h + self.mlp(normed), present_k, present_v


class FusedStack(nn.Module):
    """The fused layers of one decoder stack."""

    def __init__(self, stack: nn.Module, spec: ArchSpec) -> None:
        super().__init__()
        dims = tuple(spec.attention_dims(stack.config))
        self.layers = nn.ModuleList(FusedLayer(layer, dims) for layer in spec.layers(stack))


def fusion_blocker(stack: nn.Module, spec: ArchSpec) -> str | None:
    """Why ``stack``'s layers cannot be fused (one line), or ``None`` when they can.

    Checks the modules a fused layer reads, the rotary module, and finally that one fused layer
    equals the HF layer (to 1e-4 of its largest output) on a random input with a non-empty cache.
    """
    config = stack.config
    rotary = getattr(stack, "rotary_emb", None)
    if rotary is None:
        return "its positions are learned, not rotary"
    rope = getattr(rotary, "rope_type", "default")
    if rope not in _STATIC_ROPE:
        return f"its rotary scaling {rope!r} changes with the sequence length"
    dims = spec.attention_dims(config)
    if dims.head_dim % 2 or dims.heads % dims.kv_heads:
        return f"its attention has {dims.heads} heads over {dims.kv_heads} KV heads of size {dims.head_dim}"
    for layer in spec.layers(stack):
        missing = _missing_modules(layer)
        if missing:
            return f"its layers lack {', '.join(missing)} (not a Llama-style layer)"
    with torch.no_grad():
        full = stack.rotary_emb(torch.zeros(1, 1, dims.head_dim), position_ids=torch.arange(4).unsqueeze(0))[0]
    half = dims.head_dim // 2
    if full.shape[-1] != dims.head_dim or not torch.equal(full[0, :, :half], full[0, :, half:]):
        return "its rotary values are not in the rotate-half layout over the whole head"
    difference = _layer_difference(stack, spec)
    if not difference <= _CHECK_TOLERANCE:
        return f"a fused layer differs from the model's own by {difference:.3g} (norm, activation or attention differ)"
    return None


def _missing_modules(layer: nn.Module) -> list[str]:
    wanted = (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp",
    )
    return [name for name in wanted if _get(layer, name) is None] + (
        [] if hasattr(getattr(layer, "self_attn", None), "scaling") else ["self_attn.scaling"]
    )


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _layer_difference(stack: nn.Module, spec: ArchSpec) -> float:
    """Largest |difference| between fused layer 0 and the HF layer 0 (B=1, 3 new tokens, 4 cached), over
    max(1, largest |value|)."""
    config, dims = stack.config, spec.attention_dims(stack.config)
    layer = spec.layers(stack)[0]
    fused = FusedLayer(layer, tuple(dims))
    generator = torch.Generator().manual_seed(0)
    dtype = layer.input_layernorm.weight.dtype
    past, new = 4, 3
    h = torch.randn(1, new, config.hidden_size, generator=generator).to(dtype)
    past_k = torch.randn(1, dims.kv_heads, past, dims.head_dim, generator=generator).to(dtype)
    past_v = torch.randn(1, dims.kv_heads, past, dims.head_dim, generator=generator).to(dtype)
    mask = torch.ones(1, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).unsqueeze(0)
    ctx = spec.traced_context(stack, h, attention_mask=mask, position_ids=positions)
    cache = DynamicCache(ddp_cache_data=[(past_k.clone(), past_v.clone())])
    with torch.no_grad():
        expected = spec.call_layer(layer, h, ctx, 0, cache)
        actual, present_k, present_v = fused(h, step_inputs(ctx, ctx.layer_types[0]), past_k, past_v)
    pairs = ((actual, expected), (present_k, cache.layers[0].keys), (present_v, cache.layers[0].values))
    return max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in pairs)


class _FusedSpec:
    """``spec`` with :meth:`call_layer` running the fused layer (everything else delegated)."""

    def __init__(self, spec: ArchSpec, stack: FusedStack) -> None:
        self._spec = spec
        self._stack = stack
        self._steps: dict[str, tuple[Tensor, StepInputs]] = {}  # layer type -> (its mask, step inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spec, name)

    def call_layer(self, layer: nn.Module, h: Tensor, ctx: LayerContext, idx: int, cache: Any) -> Tensor:
        entry = cache.layers[idx]  # DynamicCache filled from the graph's past inputs (export.graphs)
        kind = ctx.layer_types[idx]
        mask = ctx.masks[kind]
        if kind not in self._steps or self._steps[kind][0] is not mask:  # once per forward of the stack, not per layer
            self._steps[kind] = (mask, step_inputs(ctx, kind))
        step = self._steps[kind][1]
        h, entry.keys, entry.values = self._stack.layers[idx](h, step, entry.keys, entry.values)
        return h


@contextlib.contextmanager
def fused_view(model: ShadowForCausalLM, *, base: bool, shadow: bool) -> Iterator[None]:
    """Inside, the chosen stacks of ``model`` run fused layers (graph wrappers trace them); restored after.

    The fused modules are attached to ``model`` so that their weights are the traced graph's
    initializers.
    """
    saved = model.spec, model.shadow_spec
    try:
        if shadow:
            model.fused_shadow = FusedStack(model.shadow_model, model.shadow_spec)
            model.shadow_spec = _FusedSpec(saved[1], model.fused_shadow)
        if base:
            model.fused_base = FusedStack(model.base_backbone, model.spec)
            model.spec = _FusedSpec(saved[0], model.fused_base)
        yield
    finally:
        model.spec, model.shadow_spec = saved
        for name in ("fused_base", "fused_shadow"):
            if name in model._modules:
                del model._modules[name]


def _frozen(weight: Tensor) -> nn.Parameter:
    return nn.Parameter(weight.detach().clone(), requires_grad=False)
