"""Quantizing one exported graph file: load, run its weight format's pass, save atomically.

:func:`quantize_graph` is deterministic (same input, byte-identical output) and atomic: files are
written in a scratch folder beside ``dst`` and moved into place with ``os.replace``. The result
reports the parameters the quantizer actually wrote (read back from the output's MatMulNBits nodes)
and the manifest name they give.

Both quantizers only see a weight that is an initializer feeding MatMul input B directly; one that
reaches B through another node (a Transpose of a tied embedding, a Cast) silently stays fp32.
:func:`unquantized_matmul_weights` finds those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from shadowpeft.export.errors import QuantizationError
from shadowpeft.export.quantize.formats import DEFAULT_PARAMS, QuantizationParams, weight_format
from shadowpeft.export.quantize.passes import root_logging_kept

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "QUANTIZED_MATMUL_OPS",
    "QuantizeResult",
    "quantize_graph",
    "unquantized_matmul_weights",
]

logger = logging.getLogger(__name__)

#: Output graphs whose tensors exceed this many bytes keep them in ``<dst name>.data``: protobuf
#: cannot write a file over 2 GiB, and the graph itself needs some of that room.
EXTERNAL_DATA_THRESHOLD = 1536 << 20
#: Op types that carry a quantized MatMul weight in an output graph.
QUANTIZED_MATMUL_OPS = frozenset({"MatMulNBits"})

_ONNX_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)
# What onnx and onnxruntime's quantizers raise on a graph they cannot handle (they assert, index and
# look up freely); anything else, e.g. MemoryError, is not theirs to explain and propagates.
_TOOL_ERRORS = (AssertionError, LookupError, RuntimeError, TypeError, ValueError, *_ONNX_ERRORS)


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_graph` wrote.

    Attributes:
        weights: The weight format written (``fp32``, ``int8`` or ``int4``).
        path: The output graph (its external data, if any, is ``<path>.data``).
        bytes_before: Size of the source graph plus its external data files.
        bytes_after: Size of the output graph plus its external data file.
        quantized_matmuls: MatMul weights converted: output nodes of :data:`QUANTIZED_MATMUL_OPS` whose
            weight input is an initializer.
        block_size: MatMulNBits block size the quantizer wrote (int8 and int4), ``None`` for fp32.
        accuracy_level: MatMulNBits ``accuracy_level`` the quantizer wrote (int8 and int4), ``None`` for fp32.
    """

    weights: str
    path: Path
    bytes_before: int
    bytes_after: int
    quantized_matmuls: int
    block_size: int | None = None
    accuracy_level: int | None = None

    @property
    def quantization(self) -> str:
        """The manifest's ``quantization`` for this graph, e.g. ``int8-block64-acc4`` (``none`` for fp32)."""
        return weight_format(self.weights).manifest_name(QuantizationParams(self.block_size, self.accuracy_level))


def quantize_graph(
    src: Path,
    dst: Path,
    *,
    weights: str,
    block_size: int = DEFAULT_PARAMS.block_size,
    accuracy_level: int = DEFAULT_PARAMS.accuracy_level,
    symmetric: bool = True,
) -> QuantizeResult:
    """Writes ``src`` with its MatMul weights quantized to ``weights`` as ``dst``.

    Args:
        src: An fp32 ``.onnx`` graph; its external data is read from its folder.
        dst: The graph to write (may equal ``src``). Tensors go to ``<dst name>.data`` beside it when
            they exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes.
        weights: A registered weight format (:data:`~shadowpeft.export.quantize.formats.FORMATS`):
            ``int8`` or ``int4`` (block-wise MatMulNBits) or ``fp32`` (re-save).
        block_size: Requested weights per quantization block along K (a power of two >= 16), for a
            format that takes it (int4); int8 uses its own
            (:data:`~shadowpeft.export.quantize.formats.INT8_BLOCK_SIZE`).
        accuracy_level: Requested MatMulNBits ``accuracy_level`` (0-4; 4 = int8 activations), for a
            format that takes it (int4); int8 uses 4.
        symmetric: Quantize weights without zero points (int8 and int4).

    Returns:
        What was written, with sizes, the number of quantized MatMul weights and the parameters used.

    Raises:
        QuantizationError: For an unknown or unsupported ``weights``, a bad int4 option, a missing or
            unreadable ``src``, a failing quantizer, or an unwritable ``dst``. ``dst`` is then unchanged.
    """
    src, dst = Path(src), Path(dst)
    fmt = weight_format(weights)
    params = fmt.parameters(QuantizationParams(block_size, accuracy_level))
    model, bytes_before = _load(src)
    if fmt.quantizes:
        _warn_unquantizable(model, weights, src)
    with _staging(dst) as (staged, scratch):
        if fmt.run is not None:
            try:
                with root_logging_kept():
                    model = fmt.run(
                        model,
                        block_size=params.block_size,
                        accuracy_level=params.accuracy_level,
                        symmetric=symmetric,
                        scratch=scratch,
                    )
            except _TOOL_ERRORS as exc:
                raise QuantizationError(
                    f"onnxruntime's {weights} quantizer failed on {str(src)!r}: {type(exc).__name__}: {exc}. Check "
                    "that onnxruntime loads the fp32 graph, or export with --weights fp32 and report this."
                ) from exc
        initializers = {tensor.name for tensor in model.graph.initializer}
        quantized = sum(n.op_type in QUANTIZED_MATMUL_OPS and n.input[1] in initializers for n in model.graph.node)
        applied = _applied_params(model, params, src)
        try:
            _save(model, staged)
        except OSError as exc:
            raise QuantizationError(f"Cannot write {str(dst)!r}: {exc}. Check free space and permissions.") from exc
    return QuantizeResult(
        weights=weights,
        path=dst,
        bytes_before=bytes_before,
        bytes_after=sum(path.stat().st_size for path in (dst, _data_path(dst)) if path.is_file()),
        quantized_matmuls=quantized,
        block_size=applied.block_size,
        accuracy_level=applied.accuracy_level,
    )


def _applied_params(model: onnx.ModelProto, requested: QuantizationParams, src: Path) -> QuantizationParams:
    """The block size and accuracy level of the output's quantized MatMuls (``requested`` if it has none).

    Raises:
        QuantizationError: The quantizer wrote MatMuls with different parameters.
    """
    found = set()
    for node in model.graph.node:
        if node.op_type in QUANTIZED_MATMUL_OPS:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found.add(QuantizationParams(attributes.get("block_size"), attributes.get("accuracy_level", 0)))
    if len(found) > 1:
        raise QuantizationError(
            f"The quantizer wrote {str(src)!r} with mixed MatMulNBits parameters {sorted(map(str, found))}; "
            "expected one block size and accuracy level. This is a bug: report it."
        )
    return found.pop() if found else requested


def unquantized_matmul_weights(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose weight the quantizers cannot see.

    A MatMul's B is a hidden weight when it is computed from initializers and ``Constant`` nodes
    alone (e.g. ``Transpose(W)``) instead of being an initializer itself. MatMuls of two activations
    (attention scores) are not listed. Only the main graph is searched.

    Args:
        model: A loaded graph (external data need not be loaded).

    Returns:
        Names of those MatMul nodes (the output name for an unnamed node), in graph order.
    """
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    constant = set(initializers)
    for node in graph.node:  # ONNX requires topological order
        if all(name in constant for name in node.input if name) and not node.op_type.startswith("Random"):
            constant.update(node.output)
    return [
        node.name or node.output[0]
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] not in initializers and node.input[1] in constant
    ]


def _load(src: Path) -> tuple[onnx.ModelProto, int]:
    """Loads ``src`` with its external data; returns it and the bytes of every file it spans."""
    if not src.is_file():
        raise QuantizationError(f"Source graph {str(src)!r} does not exist. Pass the .onnx file the export wrote.")
    try:
        model = onnx.load(src, load_external_data=False)
        external = [t for t in _tensors(model) if onnx.external_data_helper.uses_external_data(t)]
        files = {src.parent / onnx.external_data_helper.ExternalDataInfo(t).location for t in external}
        onnx.load_external_data_for_model(model, str(src.parent))
    except (OSError, DecodeError, *_ONNX_ERRORS) as exc:
        raise QuantizationError(
            f"Cannot read ONNX graph {str(src)!r}: {exc}. Re-export it, and keep its .data file beside it."
        ) from exc
    return model, src.stat().st_size + sum(path.stat().st_size for path in files)


def _tensors(model: onnx.ModelProto) -> Iterable[onnx.TensorProto]:
    """Initializers and tensor attributes, subgraphs included. onnx has no public walker; this private
    one backs its own external-data functions and onnxruntime's tools use it too."""
    return onnx.external_data_helper._get_all_tensors(model)


def _warn_unquantizable(model: onnx.ModelProto, weights: str, src: Path) -> None:
    hidden = unquantized_matmul_weights(model)
    if hidden:
        fix = "Export each weight as an initializer feeding MatMul input B."
        logger.warning("%s: MatMul weights hidden behind other nodes stay fp32: %s. %s", src, ", ".join(hidden), fix)
    # onnxruntime's dynamic (IntegerOps) registry and MatMulNBitsQuantizer both lack Gemm.
    gemms = [node.name or node.output[0] for node in model.graph.node if node.op_type == "Gemm"]
    if gemms:
        logger.warning("%s: Gemm weights stay fp32 under %s: %s.", src, weights, ", ".join(gemms))


def _save(model: onnx.ModelProto, path: Path) -> None:
    size = sum(tensor.ByteSize() for tensor in _tensors(model))
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, path, save_as_external_data=True, location=_data_path(path).name, size_threshold=1024)
    else:
        onnx.save_model(model, path)


def _data_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".data")


@contextlib.contextmanager
def _staging(dst: Path) -> Iterator[tuple[Path, Path]]:
    """Yields ``(staged, scratch)``: where to write ``dst`` (same name, for its ``.data`` location) and a
    folder for temporaries, both in one fresh folder beside ``dst``. On success moves the staged files
    to ``dst``, external data first so that the graph never points at a missing file; always removes
    the folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        (folder / "out").mkdir()
        (folder / "scratch").mkdir()
        staged = folder / "out" / dst.name
        yield staged, folder / "scratch"
        has_data = _data_path(staged).is_file()
        for path in (_data_path(staged), staged) if has_data else (staged,):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(path, dst.parent / path.name)
        if not has_data and _data_path(dst).is_file():
            _data_path(dst).unlink()  # a stale .data from an earlier, larger output of ours
    finally:
        shutil.rmtree(folder, ignore_errors=True)
