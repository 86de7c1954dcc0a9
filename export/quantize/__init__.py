"""Weight quantization of exported graphs, with onnxruntime's own tools only.

    formats.py    the registry: each weight format's pass, parameters and manifest name
    passes.py     the passes (onnxruntime's MatMulNBitsQuantizer and quantize_dynamic)
    graph.py      quantize_graph: one graph file in, one out, atomically; what the quantizer wrote
    agreement.py  judging a quantized graph against its reference (top-1 agreement, KL)

    weights  pass                                        each MatMul with an initializer B becomes
    int8     MatMulNBitsQuantizer, bits=8 (block 64)     MatMulNBits (com.microsoft), accuracy_level 4
    int4     MatMulNBitsQuantizer, bits=4 (block 32)     MatMulNBits (com.microsoft)
    fp32     none: the graph is re-saved as it is

Both formats quantize weights block-wise along K (symmetric, one scale per block and column);
with ``accuracy_level`` 4 onnxruntime also quantizes the activation to int8 per block of K and
multiplies in int8 (why int8 is block-wise: see :mod:`~shadowpeft.export.quantize.formats`).

Embedding tables (Gather of an initializer) are quantized too: int8 per-tensor with
``quantize_dynamic`` and a DequantizeLinear after the Gather (the nbits quantizer's Gather path is
4-bit only), int4 block-wise along the hidden axis (GatherBlockQuantized). On SmolLM2's detached
graph this takes int8 from 241 MB to 62 MB and int4 to 38 MB.

Quantized graphs are judged by :func:`agreement` (top-1 agreement and KL divergence against the
fp32 graph), never by allclose.
"""

from __future__ import annotations

from shadowpeft.export.quantize.agreement import Agreement, agreement
from shadowpeft.export.quantize.formats import (
    DEFAULT_PARAMS,
    FORMATS,
    FP32,
    INT4,
    INT8,
    INT8_BLOCK_SIZE,
    QuantizationParams,
    WeightFormatPass,
    register,
    weight_format,
)
from shadowpeft.export.quantize.graph import (
    EXTERNAL_DATA_THRESHOLD,
    QUANTIZED_MATMUL_OPS,
    QuantizeResult,
    quantize_graph,
    unquantized_matmul_weights,
)
from shadowpeft.export.quantize.passes import MIN_QUANTIZED_DIM

__all__ = [
    "DEFAULT_PARAMS",
    "EXTERNAL_DATA_THRESHOLD",
    "FORMATS",
    "FP32",
    "INT4",
    "INT8",
    "INT8_BLOCK_SIZE",
    "MIN_QUANTIZED_DIM",
    "QUANTIZED_MATMUL_OPS",
    "Agreement",
    "QuantizationParams",
    "QuantizeResult",
    "WeightFormatPass",
    "agreement",
    "quantize_graph",
    "register",
    "unquantized_matmul_weights",
    "weight_format",
]
