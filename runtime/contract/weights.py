"""Weight formats and quantization names: the vocabulary export, profiles and manifests share.

The quantization passes themselves live in ``shadowpeft.export``; this module only names them::

    weights  manifest ``quantization``            GraphSpec.weights of an on-device graph
    fp32     none                                  fp32
    int8     int8-block{block}-acc{level}          int8
    int4     int4-block{block}-acc{level}          int4
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "FP16",
    "FP32",
    "INT4",
    "INT4_ACCURACY_LEVELS",
    "INT8",
    "NO_QUANTIZATION",
    "WEIGHT_FORMATS",
    "WeightFormat",
    "quantization_name",
]

WeightFormat = Literal["fp32", "fp16", "int8", "int4"]
#: Every weight format a graph or a device profile may name.
WEIGHT_FORMATS: tuple[str, ...] = get_args(WeightFormat)
FP32, FP16, INT8, INT4 = WEIGHT_FORMATS

#: The manifest's ``quantization`` when the on-device graphs keep fp32 weights.
NO_QUANTIZATION = "none"

#: onnxruntime MatMulNBits ``accuracy_level``: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.
INT4_ACCURACY_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)


def quantization_name(weights: str, *, block_size: int | None = None, accuracy_level: int | None = None) -> str:
    """The manifest's ``quantization`` for on-device graphs of ``weights``, e.g. ``int4-block32-acc4``.

    Args:
        weights: One of :data:`WEIGHT_FORMATS`.
        block_size: MatMulNBits block size (needed unless ``weights`` is ``fp32``).
        accuracy_level: MatMulNBits ``accuracy_level`` (needed unless ``weights`` is ``fp32``).

    Raises:
        ValueError: For an unknown format, or a quantized one without its block size and accuracy level.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"Unknown weight format {weights!r}; known: {', '.join(WEIGHT_FORMATS)}.")
    if weights == FP32:
        return NO_QUANTIZATION
    if block_size is None or accuracy_level is None:
        raise ValueError(f"A {weights} quantization name needs its block_size and accuracy_level.")
    return f"{weights}-block{block_size}-acc{accuracy_level}"
