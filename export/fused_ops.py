"""Four PyTorch operators that trace to one onnxruntime fused operator each.

A fused export (:mod:`shadowpeft.export.fused_layers`) writes a decoder layer with these calls
instead of the Hugging Face module's dozens of small ops. Each is a ``torch.library`` custom op
with a plain PyTorch reference body (so the fused layer runs, and is tested, in PyTorch too), and
:data:`TRANSLATIONS` tells ``torch.onnx.export`` which onnxruntime operator each becomes:

=====================  ======================================================================
``rms_norm``           ``SimplifiedLayerNormalization`` (onnxruntime's RMSNorm, default domain)
``skip_rms_norm``      ``com.microsoft.SkipSimplifiedLayerNormalization``: residual add + RMSNorm
``rotary``             ``com.microsoft.RotaryEmbedding`` on a ``(B, T, heads * head_dim)`` tensor
``gqa``                ``com.microsoft.GroupQueryAttention``: grouped-query attention that appends
                       the new keys/values to the past ones and returns both (``present``)
=====================  ======================================================================

The attention keeps the graph contract unchanged: past and present KV tensors are
``(B, kv_heads, P, head_dim)`` and the caller's additive mask ``(B, 1, T, P+T)`` (causal, padding,
sliding window) goes in as ``attention_bias``, so left-padded batches and per-row positions work as
in the standard graph. onnxruntime's operator also applies its own causal rule; the ``seqlens_k``
it is given make every row's past ``P`` long, so that rule equals the mask's causal part.
"""

from __future__ import annotations

import functools

import onnx
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_schemas
from onnxscript.values import Op, Opset
from torch import Tensor

__all__ = ["TRANSLATIONS", "gqa", "lengths", "rms_norm", "rotary", "skip_rms_norm"]

_MICROSOFT = "com.microsoft"
_DEFAULT = ""  # onnxruntime registers SimplifiedLayerNormalization in the default domain
_FLOAT = 1  # onnx.TensorProto.FLOAT: the statistics type of the norms


# ------------------------------------------------------------------------------------------------ norms
@torch.library.custom_op("shadowpeft::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)``, statistics in fp32 (the HF RMSNorm's math)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("shadowpeft::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + skip), x + skip)``: a residual add and the norm that follows it."""
    total = x + skip
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _(x: Tensor, skip: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


# ------------------------------------------------------------------------------------------------ rotary
@torch.library.custom_op("shadowpeft::rotary", mutates_args=())
def rotary(x: Tensor, position_ids: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """Rotary embedding (halves rotated, the HF ``rotate_half`` layout) of ``x`` (B, T, heads * head_dim).

    ``cos``/``sin`` are ``(N, head_dim / 2)`` rows read at ``position_ids`` (B, T): a table by position, or
    (as the fused layers pass them) the rows of this step's tokens, indexed ``0 .. B*T-1``.
    """
    b, t, width = x.shape
    h = x.view(b, t, heads, width // heads)
    c, s = cos[position_ids].unsqueeze(2), sin[position_ids].unsqueeze(2)  # (B, T, 1, head_dim/2)
    x1, x2 = h.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).reshape(b, t, width)


@rotary.register_fake
def _(x: Tensor, position_ids: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    return torch.empty_like(x)


# ------------------------------------------------------------------------------------------------ attention
@torch.library.custom_op("shadowpeft::gqa", mutates_args=())
def gqa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor,
    past_v: Tensor,
    seqlens_k: Tensor,
    total: Tensor,
    bias: Tensor,
    heads: int,
    kv_heads: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped-query attention over past + new keys: ``(out, present_k, present_v)``.

    Args:
        q: (B, T, heads * D) queries, rotary applied.
        k, v: (B, T, kv_heads * D) new keys (rotary applied) and values.
        past_k, past_v: (B, kv_heads, P, D).
        seqlens_k: (B,) int32, ``P + T - 1`` for every row (see :func:`lengths`); onnxruntime's inputs,
            unused by this reference.
        total: () int32, ``P + T``.
        bias: (B, 1, T, P+T) additive mask.
        heads, kv_heads: Query and KV head counts (``heads`` a multiple of ``kv_heads``).
        scale: Factor on ``q . k`` (usually ``D ** -0.5``).

    Returns:
        ``out`` (B, T, heads * D) and the present keys/values (B, kv_heads, P+T, D).
    """
    b, t, width = q.shape
    d = width // heads
    present_k = torch.cat((past_k, k.view(b, t, kv_heads, d).transpose(1, 2)), dim=2)
    present_v = torch.cat((past_v, v.view(b, t, kv_heads, d).transpose(1, 2)), dim=2)
    groups = heads // kv_heads
    keys = present_k.repeat_interleave(groups, dim=1)  # (B, heads, P+T, D)
    values = present_v.repeat_interleave(groups, dim=1)
    scores = (q.view(b, t, heads, d).transpose(1, 2) @ keys.transpose(2, 3)) * scale + bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (weights @ values).transpose(1, 2).reshape(b, t, width)
    return out, present_k, present_v


@gqa.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total, bias, heads, kv_heads, scale):
    b, kvh, p, d = past_k.shape
    t = q.shape[1]
    present = past_k.new_empty(b, kvh, p + t, d)
    return torch.empty_like(q), present, present.clone()


def lengths(bias: Tensor) -> tuple[Tensor, Tensor]:
    """``(seqlens_k, total)`` for :func:`gqa` from the additive mask (B, 1, T, P+T), in plain ops.

    Computed once per stack and shared by its layers: ``(B,)`` int32 ``P+T-1`` and ``()`` int32 ``P+T``.
    """
    width = torch.ones_like(bias[:, 0, 0, :], dtype=torch.int32).sum(-1, dtype=torch.int32)  # (B,) P+T
    return width - 1, width.max()


# ------------------------------------------------------------------------------------------------ ONNX
@functools.cache
def _op(name: str, domain: str, outputs: int | None = None) -> Op:
    """An onnxscript op for onnxruntime's operator ``domain.name``, its schema read from onnxruntime.

    onnx's schema registry knows only standard operators; the exporter's tracer needs a schema
    to bind inputs and attributes, so the one onnxruntime registers is converted. ``outputs``
    keeps only the first outputs (the tracer gives a node every output its schema lists, and an
    optional output that is present can switch a feature on).
    """
    found = [s for s in ort_schemas.get_all_operator_schema() if s.name == name and s.domain == domain]
    if not found:
        raise RuntimeError(f"onnxruntime {ort_schemas.__name__} has no operator {domain or 'ai.onnx'}.{name}.")
    source = max(found, key=lambda s: s.since_version)
    options = onnx.defs.OpSchema.FormalParameterOption

    def parameter(p) -> onnx.defs.OpSchema.FormalParameter:
        return onnx.defs.OpSchema.FormalParameter(p.name, p.typeStr, param_option=options(int(p.option)))

    schema = onnx.defs.OpSchema(
        name,
        domain,
        source.since_version,
        inputs=[parameter(p) for p in source.inputs],
        outputs=[parameter(p) for p in source.outputs[:outputs]],
        type_constraints=[(c.type_param_str, list(c.allowed_type_strs), "") for c in source.type_constraints],
        attributes=[
            onnx.defs.OpSchema.Attribute(a.name, onnx.defs.OpSchema.AttrType(int(a.type)), "", required=a.required)
            for a in source.attributes.values()
        ],
    )
    return Op(Opset(domain, source.since_version), name, schema)


def _rms_norm_onnx(x, weight, eps: float):
    outputs = _op("SimplifiedLayerNormalization", _DEFAULT)(x, weight, axis=-1, epsilon=eps, stash_type=_FLOAT)
    return outputs[0]  # the second output is the inverse deviation, for training


def _skip_rms_norm_onnx(x, skip, weight, eps: float):
    out, _mean, _inv_std, total = _op("SkipSimplifiedLayerNormalization", _MICROSOFT)(x, skip, weight, epsilon=eps)
    return out, total


def _rotary_onnx(x, position_ids, cos, sin, heads: int):
    return _op("RotaryEmbedding", _MICROSOFT)(x, position_ids, cos, sin, num_heads=heads, interleaved=0)


def _gqa_onnx(q, k, v, past_k, past_v, seqlens_k, total, bias, heads: int, kv_heads: int, scale: float):
    outputs = _op("GroupQueryAttention", _MICROSOFT, outputs=3)(
        q,
        k,
        v,
        past_k,
        past_v,
        seqlens_k,
        total,
        None,  # cos_cache: rotary runs before, with explicit positions
        None,  # sin_cache
        None,  # position_ids
        bias,
        num_heads=heads,
        kv_num_heads=kv_heads,
        scale=scale,
    )
    return outputs[0], outputs[1], outputs[2]


#: ``custom_translation_table`` for ``torch.onnx.export``.
TRANSLATIONS = {
    torch.ops.shadowpeft.rms_norm.default: _rms_norm_onnx,
    torch.ops.shadowpeft.skip_rms_norm.default: _skip_rms_norm_onnx,
    torch.ops.shadowpeft.rotary.default: _rotary_onnx,
    torch.ops.shadowpeft.gqa.default: _gqa_onnx,
}
