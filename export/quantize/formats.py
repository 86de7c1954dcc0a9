"""The weight-format registry: each format's pass, parameters and manifest name, declared once.

    format  --quantize  pass                                   parameters                  manifest
    fp32    none        none: the graph is re-saved as it is   -                           none
    int8    int8        MatMulNBits bits=8 + int8 Gather       block 64, accuracy level 4  int8-block64-acc4
    int4    int4        MatMulNBits bits=4 + int4 Gather       the profile's (32, 4)       int4-block32-acc4

A device profile's quantization parameters travel once, as :class:`QuantizationParams`
(:meth:`QuantizationParams.from_profile`): a format either takes them (int4) or has its own fixed
ones (int8). The manifest records what the quantizer actually wrote
(:attr:`~shadowpeft.export.quantize.graph.QuantizeResult.quantization`).

Add a format: declare a :class:`WeightFormatPass` below with its pass
(:mod:`~shadowpeft.export.quantize.passes`) and :func:`register` it, then give it agreement
thresholds in ``tests/tolerances.py``; the CLI's ``--quantize`` choices and the export pipeline read
this registry.

Why int8 is block-wise: int8 first used ``quantize_dynamic`` (per-channel weights, one dynamic scale
for the whole activation tensor): on SmolLM2 that one scale, set by a few outlier channels, broke
the 30-layer coupled graph (top-1 agreement with fp32 45.8%, mean KL 0.74, split chain 91.7%, on
held-out text, trained shadow). Block-wise int8 with blocks of 64 measured 90.6% coupled (KL 0.013),
95.8% split (KL 0.002), 99.0% detached (unchanged), and decoded at least as fast (coupled 12.8 vs
16-18 ms/token on 2 busy cores). Blocks of 32 and 128 agreed about as well (coupled 95.8% / 93.8%,
96 positions); 64 divides common hidden sizes (576, 2048, ...), so no block is padded, and gave
the smallest files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import onnx

from shadowpeft.export.errors import QuantizationError
from shadowpeft.export.quantize.passes import int4_pass, int8_pass
from shadowpeft.runtime.contract import (
    FP32,
    INT4,
    INT4_ACCURACY_LEVELS,
    INT8,
    NO_QUANTIZATION,
    WEIGHT_FORMATS,
    quantization_name,
)
from shadowpeft.runtime.devices import DeviceProfile

__all__ = [
    "DEFAULT_PARAMS",
    "FORMATS",
    "FP32",
    "INT4",
    "INT8",
    "INT8_BLOCK_SIZE",
    "QuantizationParams",
    "WeightFormatPass",
    "register",
    "weight_format",
]


#: MatMulNBits block size (weights per block along K) of the int8 format.
INT8_BLOCK_SIZE = 64
#: The manifest's ``quantization`` of graphs whose weights were left as they are.
NOT_QUANTIZED = NO_QUANTIZATION


@dataclass(frozen=True)
class QuantizationParams:
    """Parameters of a block-wise quantization pass.

    Attributes:
        block_size: Weights per quantization block along K, or ``None`` when nothing is quantized.
        accuracy_level: MatMulNBits ``accuracy_level`` (0-4; 4 = int8 activations), or ``None``.
    """

    block_size: int | None = None
    accuracy_level: int | None = None

    @classmethod
    def from_profile(cls, profile: DeviceProfile | None) -> QuantizationParams:
        """The parameters a device profile asks for (:data:`DEFAULT_PARAMS` without a profile)."""
        if profile is None:
            return DEFAULT_PARAMS
        return cls(profile.int4_block_size, profile.int4_accuracy_level)


#: What an export without a device profile asks for: the DeviceProfile defaults.
DEFAULT_PARAMS = QuantizationParams(block_size=32, accuracy_level=4)


class Pass(Protocol):
    def __call__(
        self, model: onnx.ModelProto, *, block_size: int, accuracy_level: int, symmetric: bool, scratch: Path
    ) -> onnx.ModelProto: ...


@dataclass(frozen=True)
class WeightFormatPass:
    """One weight format of the on-device graphs.

    Attributes:
        name: The format's name (``weights`` in device profiles, manifests and the API).
        option: Its ``shadow-export --quantize`` value.
        run: The quantization pass, or ``None`` for a format that keeps the fp32 weights.
        fixed: Parameters the format always uses, whatever is requested; ``None``: it takes the
            requested ones (checked by ``check``).
        check: Problems with requested parameters, as messages (formats that take them).
    """

    name: str
    option: str
    run: Pass | None = None
    fixed: QuantizationParams | None = None
    check: Callable[[QuantizationParams], list[str]] | None = None

    @property
    def quantizes(self) -> bool:
        return self.run is not None

    def parameters(self, requested: QuantizationParams) -> QuantizationParams:
        """The parameters this format quantizes with when ``requested`` are asked for.

        Raises:
            QuantizationError: Listing every problem with ``requested``, for a format that takes them.
        """
        if not self.quantizes:
            return QuantizationParams()
        if self.fixed is not None:
            return self.fixed
        problems = self.check(requested) if self.check is not None else []
        if problems:
            raise QuantizationError("; ".join(problems))
        return requested

    def manifest_name(self, params: QuantizationParams) -> str:
        """The manifest's ``quantization`` of graphs written with ``params``, e.g. ``int4-block32-acc4``."""
        if not self.quantizes:
            return NOT_QUANTIZED
        return quantization_name(self.name, block_size=params.block_size, accuracy_level=params.accuracy_level)


FORMATS: dict[str, WeightFormatPass] = {}


def register(fmt: WeightFormatPass) -> WeightFormatPass:
    """Adds ``fmt`` to :data:`FORMATS`; its name must be one of the runtime's weight formats."""
    if fmt.name not in WEIGHT_FORMATS:
        raise ValueError(f"Weight format {fmt.name!r} is not in the runtime's vocabulary {WEIGHT_FORMATS}.")
    if fmt.name in FORMATS or fmt.option in {f.option for f in FORMATS.values()}:
        raise ValueError(f"Weight format {fmt.name!r} (--quantize {fmt.option}) is registered twice.")
    FORMATS[fmt.name] = fmt
    return fmt


def weight_format(name: object) -> WeightFormatPass:
    """The registered format called ``name``.

    Raises:
        QuantizationError: ``name`` is not registered; the message names the registered formats.
    """
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is not None:
        return fmt
    supported = ", ".join(FORMATS)
    if name in WEIGHT_FORMATS:
        raise QuantizationError(
            f"Weight format {name!r} is not supported yet: no pass is registered for it in "
            f"shadowpeft/export/quantize/formats.py (fp16 needs a float16 converter, which onnxruntime's tools "
            f"lack). Use one of {supported}."
        )
    raise QuantizationError(f"Unknown weight format {name!r}. Supported: {supported}. Pass one of these as weights.")


def _nbits_problems(requested: QuantizationParams) -> list[str]:
    """MatMulNBits' constraints on a requested block size and accuracy level."""
    block, level = requested.block_size, requested.accuracy_level
    problems = []
    if not isinstance(block, int) or isinstance(block, bool) or block < 16 or block & (block - 1):
        problems.append(f"int4 block_size must be a power of two >= 16 (MatMulNBits); got {block!r}. Use 32 or 128.")
    if level not in INT4_ACCURACY_LEVELS:
        problems.append(
            f"int4 accuracy_level must be one of {', '.join(map(str, INT4_ACCURACY_LEVELS))}; got {level!r}. "
            "Use 4 (int8 activations) on CPU."
        )
    return problems


register(WeightFormatPass(name=FP32, option="none"))
register(
    WeightFormatPass(
        name=INT8, option="int8", run=int8_pass, fixed=QuantizationParams(block_size=INT8_BLOCK_SIZE, accuracy_level=4)
    )
)
register(WeightFormatPass(name=INT4, option="int4", run=int4_pass, check=_nbits_problems))
