"""The quantization passes: onnxruntime's MatMulNBitsQuantizer and quantize_dynamic, kept quiet.

Each pass maps an fp32 ``onnx.ModelProto`` to a quantized one with the parameters its weight format
resolved (:class:`~shadowpeft.export.quantize.formats.QuantizationParams`); which pass serves which
format is declared in :mod:`shadowpeft.export.quantize.formats`.

Both MatMul passes only see a weight that is an initializer feeding MatMul input B directly; MatMul
weights with a dimension below :data:`MIN_QUANTIZED_DIM` stay fp32.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

__all__ = ["MIN_QUANTIZED_DIM", "int4_pass", "int8_pass", "root_logging_kept"]

#: MatMul weights with a dimension below this stay fp32 (int8 and int4): the shadow's rank-16
#: injections and width-10 update MLPs. They hold about 1% of SmolLM2's coupled weights, and
#: quantizing their activations costs more than their fp32 product: the coupled int8 graph decoded
#: at 15.8 instead of 19.7 ms/token with them left fp32 (top-1 agreement 93.8% vs 90.6%; one run
#: each, 2 busy cores).
MIN_QUANTIZED_DIM = 64


def int8_pass(
    model: onnx.ModelProto, *, block_size: int, accuracy_level: int, symmetric: bool, scratch: Path
) -> onnx.ModelProto:
    """MatMul weights: 8-bit MatMulNBits; embedding tables: int8 per tensor, dequantized after the Gather."""
    # Block-wise weights; accuracy_level 4 quantizes the activation per block too (see formats.py for
    # why not quantize_dynamic's per-tensor activation scale).
    model = _nbits(
        model, bits=8, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric, gather=False
    )
    # Embedding tables: the nbits quantizer's Gather path is 4-bit only, so quantize_dynamic does them
    # (only the looked-up rows are dequantized).
    out = scratch / "int8.onnx"
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=["Gather"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        # Always external: the output size is unknown here; the caller decides the final layout.
        use_external_data_format=True,
        extra_options={"WeightSymmetric": symmetric},
    )
    return onnx.load(out)


def int4_pass(
    model: onnx.ModelProto, *, block_size: int, accuracy_level: int, symmetric: bool, scratch: Path
) -> onnx.ModelProto:
    """MatMul weights and embedding tables: 4-bit MatMulNBits / GatherBlockQuantized, block-wise."""
    return _nbits(
        model, bits=4, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric, gather=True
    )


def _nbits(
    model: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int, symmetric: bool, gather: bool
) -> onnx.ModelProto:
    """MatMul weights (and, with ``gather``, embedding tables) through onnxruntime's MatMulNBitsQuantizer."""
    ops, axes = (("MatMul", "Gather"), (("MatMul", 0), ("Gather", 1))) if gather else (("MatMul",), (("MatMul", 0),))
    quantizer = _nbits_quantizer()(
        model,
        bits=bits,
        block_size=block_size,
        accuracy_level=accuracy_level,
        is_symmetric=symmetric,
        op_types_to_quantize=ops,
        quant_axes=axes,
        nodes_to_exclude=_small_matmuls(model),
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # its np.where divides all-zero blocks before masking them
        quantizer.process()
    return quantizer.model.model


def _small_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose initializer weight has a dimension below :data:`MIN_QUANTIZED_DIM`."""
    shapes = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        # onnxruntime's exclusion list matches names: an unnamed node is quantized rather than risk excluding all.
        if node.name
        and node.op_type == "MatMul"
        and node.input[1] in shapes
        and min(shapes[node.input[1]]) < MIN_QUANTIZED_DIM
    ]


def _nbits_quantizer() -> type:
    with root_logging_kept():  # importing the module configures logging: undo that at once
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    return MatMulNBitsQuantizer


@contextlib.contextmanager
def root_logging_kept() -> Iterator[None]:
    """Undoes what onnxruntime's quantizers do to the root logger, which is the whole process's.

    matmul_nbits_quantizer runs ``logging.basicConfig(level=INFO)`` at import; quantize_dynamic calls
    ``logging.warning``, which does the same when the root logger has no handler. Its advice to run
    "pre-processing" (for static quantization) does not apply here and is dropped.
    """
    root = logging.getLogger()
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    handlers, level = list(root.handlers), root.level
    ignored = _IgnoredMessages()  # one instance per use: nested uses must not remove each other's
    root.addFilter(ignored)
    nbits.addFilter(ignored)  # a logger's filter sees its own records, not the ones it propagates
    try:
        yield
    finally:
        nbits.removeFilter(ignored)
        root.removeFilter(ignored)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


# Messages of onnxruntime's quantizers that do not apply here: pre-processing advice (for static
# quantization), and the notice that int4 embedding tables need opset 21 / IR 10, to which the
# quantizer upgrades the graph (the export then loads and runs the result, and records its opset).
_IGNORED_MESSAGES = (
    "Please consider to run pre-processing",
    "The opset of the input model is under 21",
    "The IR version of the input model is",
)


class _IgnoredMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_IGNORED_MESSAGES)
