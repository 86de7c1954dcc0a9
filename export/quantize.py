"""Weight quantization passes for exported graphs, with onnxruntime's own tools only.

    weights  tool                                        each MatMul with an initializer B becomes
    int8     MatMulNBitsQuantizer, bits=8 (block 64)     MatMulNBits (com.microsoft), accuracy_level 4
    int4     MatMulNBitsQuantizer, bits=4 (block 32)     MatMulNBits (com.microsoft)
    fp32     none: the graph is re-saved as it is

Both formats quantize weights block-wise along K (symmetric, one scale per block and column);
with ``accuracy_level`` 4 onnxruntime also quantizes the activation to int8 per block of K and
multiplies in int8. int8 first used ``quantize_dynamic`` (per-channel weights, one dynamic scale
for the whole activation tensor): on SmolLM2 that one scale, set by a few outlier channels, broke
the 30-layer coupled graph (top-1 agreement with fp32 45.8%, mean KL 0.74, split chain 91.7%, on
held-out text, trained shadow). Block-wise int8 with blocks of 64 measured 90.6% coupled (KL 0.013),
95.8% split (KL 0.002), 99.0% detached (unchanged), and decoded at least as fast (coupled 12.8 vs
16-18 ms/token on 2 busy cores). Blocks of 32 and 128 agreed about as well (coupled 95.8% / 93.8%,
96 positions); 64 divides common hidden sizes (576, 2048, ...), so no block is padded, and gave
the smallest files.

Embedding tables (Gather of an initializer) are quantized too: int8 per-tensor with
``quantize_dynamic`` and a DequantizeLinear after the Gather (the nbits quantizer's Gather path is
4-bit only), int4 block-wise along the hidden axis (GatherBlockQuantized). On SmolLM2's detached
graph this takes int8 from 241 MB to 62 MB and int4 to 38 MB.

Both quantizers only see a weight that is an initializer feeding MatMul input B directly; one that
reaches B through another node (a Transpose of a tied embedding, a Cast) silently stays fp32.
:func:`unquantized_matmul_weights` finds those. :func:`agreement` judges a quantized graph against
its reference by top-1 agreement and KL divergence, never by allclose.

Every pass is deterministic (same input, byte-identical output) and atomic: files are written in a
scratch folder beside ``dst`` and moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnxruntime.quantization import QuantType, quantize_dynamic

from shadowpeft.export.errors import QuantizationError
from shadowpeft.runtime.contract import FP32, INT4, INT4_ACCURACY_LEVELS, INT8, WEIGHT_FORMATS

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "INT8_BLOCK_SIZE",
    "MIN_QUANTIZED_DIM",
    "QUANTIZED_MATMUL_OPS",
    "Agreement",
    "QuantizeResult",
    "agreement",
    "quantize_graph",
    "unquantized_matmul_weights",
]

logger = logging.getLogger(__name__)

#: Output graphs whose tensors exceed this many bytes keep them in ``<dst name>.data``: protobuf
#: cannot write a file over 2 GiB, and the graph itself needs some of that room.
EXTERNAL_DATA_THRESHOLD = 1536 << 20
#: MatMulNBits block size (weights per block along K) of the int8 format.
INT8_BLOCK_SIZE = 64
#: MatMul weights with a dimension below this stay fp32 (int8 and int4): the shadow's rank-16
#: injections and width-10 update MLPs. They hold about 1% of SmolLM2's coupled weights, and
#: quantizing their activations costs more than their fp32 product: the coupled int8 graph decoded
#: at 15.8 instead of 19.7 ms/token with them left fp32 (top-1 agreement 93.8% vs 90.6%; one run
#: each, 2 busy cores).
MIN_QUANTIZED_DIM = 64
#: Op types that carry a quantized MatMul weight in an output graph.
QUANTIZED_MATMUL_OPS = frozenset({"MatMulNBits"})

_SUPPORTED = (FP32, INT8, INT4)
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
        block_size: MatMulNBits block size (int8 and int4), ``None`` for fp32.
        accuracy_level: MatMulNBits ``accuracy_level`` (int8 and int4), ``None`` for fp32.
    """

    weights: str
    path: Path
    bytes_before: int
    bytes_after: int
    quantized_matmuls: int
    block_size: int | None = None
    accuracy_level: int | None = None


@dataclass(frozen=True)
class Agreement:
    """How closely a candidate's logits follow a reference's, over valid positions.

    Attributes:
        top1: Fraction of positions whose argmax tokens are equal.
        mean_kl: Mean KL(reference || candidate) in nats.
        positions: Number of positions compared.
    """

    top1: float
    mean_kl: float
    positions: int


def quantize_graph(
    src: Path,
    dst: Path,
    *,
    weights: str,
    block_size: int = 32,
    accuracy_level: int = 4,
    symmetric: bool = True,
) -> QuantizeResult:
    """Writes ``src`` with its MatMul weights quantized to ``weights`` as ``dst``.

    Args:
        src: An fp32 ``.onnx`` graph; its external data is read from its folder.
        dst: The graph to write (may equal ``src``). Tensors go to ``<dst name>.data`` beside it when
            they exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes.
        weights: ``int8`` or ``int4`` (block-wise MatMulNBits) or ``fp32`` (re-save).
        block_size: int4 only: weights per quantization block along K (a power of two >= 16); int8 uses
            :data:`INT8_BLOCK_SIZE`.
        accuracy_level: int4 only: MatMulNBits ``accuracy_level`` (0-4; 4 = int8 activations); int8 uses 4.
        symmetric: Quantize weights without zero points (int8 and int4).

    Returns:
        What was written, with sizes and the number of quantized MatMul weights.

    Raises:
        QuantizationError: For an unknown or unsupported ``weights``, a bad int4 option, a missing or
            unreadable ``src``, a failing quantizer, or an unwritable ``dst``. ``dst`` is then unchanged.
    """
    src, dst = Path(src), Path(dst)
    _check_options(weights, block_size, accuracy_level)
    model, bytes_before = _load(src)
    _warn_unquantizable(model, weights, src)
    with _staging(dst) as (staged, scratch):
        try:
            with _root_logging_kept():
                if weights == INT8:
                    model = _int8(model, scratch, symmetric=symmetric)
                elif weights == INT4:
                    model = _int4(model, block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric)
        except _TOOL_ERRORS as exc:
            raise QuantizationError(
                f"onnxruntime's {weights} quantizer failed on {str(src)!r}: {type(exc).__name__}: {exc}. Check "
                "that onnxruntime loads the fp32 graph, or export with --weights fp32 and report this."
            ) from exc
        initializers = {tensor.name for tensor in model.graph.initializer}
        quantized = sum(n.op_type in QUANTIZED_MATMUL_OPS and n.input[1] in initializers for n in model.graph.node)
        try:
            _save(model, staged)
        except OSError as exc:
            raise QuantizationError(f"Cannot write {str(dst)!r}: {exc}. Check free space and permissions.") from exc
    blocks = {INT8: (INT8_BLOCK_SIZE, 4), INT4: (block_size, accuracy_level)}.get(weights, (None, None))
    return QuantizeResult(
        weights=weights,
        path=dst,
        bytes_before=bytes_before,
        bytes_after=sum(path.stat().st_size for path in (dst, _data_path(dst)) if path.is_file()),
        quantized_matmuls=quantized,
        block_size=blocks[0],
        accuracy_level=blocks[1],
    )


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


def agreement(
    reference: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    candidate: Callable[[Mapping[str, np.ndarray]], np.ndarray],
    feeds: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray | None]],
) -> Agreement:
    """Top-1 agreement and mean KL(reference || candidate) of two logit functions.

    Both are computed in float64 from log-softmax, so large logits neither overflow nor lose the KL.

    Args:
        reference: Maps a feed to logits of shape (..., V), e.g. (B, T, V); the fp32 graph.
        candidate: The same for the graph under test; must return the same shape.
        feeds: ``(feed, valid)`` pairs. ``valid`` is a boolean (or 0/1) mask of the logits' leading
            shape, e.g. (B, T), that selects the positions to compare (padding is False), or ``None``
            for all positions.

    Returns:
        The agreement over every valid position of every feed.

    Raises:
        ValueError: If the logit or mask shapes differ, a logit is NaN or +inf, or no position is valid.
    """
    matches, kl_sum, positions = 0, 0.0, 0
    for index, (feed, valid) in enumerate(feeds):
        p = np.asarray(reference(feed), dtype=np.float64)  # (B, T, V)
        q = np.asarray(candidate(feed), dtype=np.float64)  # (B, T, V)
        mask = np.ones(p.shape[:-1], dtype=bool) if valid is None else np.asarray(valid).astype(bool)  # (B, T)
        if p.ndim < 2 or p.shape != q.shape or mask.shape != p.shape[:-1]:
            raise ValueError(
                f"feeds[{index}]: reference logits {p.shape}, candidate logits {q.shape} and valid mask "
                f"{mask.shape} must be (..., V), (..., V) and (...) with equal leading shapes."
            )
        for side, logits in (("reference", p), ("candidate", q)):
            if np.isnan(logits).any() or np.isposinf(logits).any():
                raise ValueError(f"feeds[{index}]: the {side} returned NaN or +inf logits; the graph is broken.")
        p, q = p[mask], q[mask]  # (N, V)
        log_p, log_q = _log_softmax(p), _log_softmax(q)
        matches += int(np.count_nonzero(p.argmax(axis=-1) == q.argmax(axis=-1)))
        # 0 * log(0 / q) = 0: a token the reference rules out (-inf logit) adds nothing.
        terms = np.where(log_p > -np.inf, np.exp(log_p) * (log_p - log_q), 0.0)
        kl_sum += float(terms.sum())
        positions += len(p)
    if positions == 0:
        raise ValueError("No valid positions to compare: every mask is all False, or feeds is empty.")
    return Agreement(top1=matches / positions, mean_kl=kl_sum / positions, positions=positions)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)  # <= 0, so exp cannot overflow
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _check_options(weights: str, block_size: int, accuracy_level: int) -> None:
    if weights not in WEIGHT_FORMATS:
        raise QuantizationError(
            f"Unknown weight format {weights!r}. Supported: {', '.join(_SUPPORTED)}. Pass one of these as weights."
        )
    if weights not in _SUPPORTED:
        raise QuantizationError(
            f"Weight format {weights!r} is not supported yet (it needs a float16 converter, which onnxruntime's "
            f"tools lack). Use one of {', '.join(_SUPPORTED)}."
        )
    if weights != INT4:
        return
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise QuantizationError(
            f"int4 block_size must be a power of two >= 16 (MatMulNBits); got {block_size!r}. Use 32 or 128."
        )
    if accuracy_level not in INT4_ACCURACY_LEVELS:
        raise QuantizationError(
            f"int4 accuracy_level must be one of {', '.join(map(str, INT4_ACCURACY_LEVELS))}; got "
            f"{accuracy_level!r}. Use 4 (int8 activations) on CPU."
        )


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
    if weights == FP32:
        return
    hidden = unquantized_matmul_weights(model)
    if hidden:
        fix = "Export each weight as an initializer feeding MatMul input B."
        logger.warning("%s: MatMul weights hidden behind other nodes stay fp32: %s. %s", src, ", ".join(hidden), fix)
    # onnxruntime's dynamic (IntegerOps) registry and MatMulNBitsQuantizer both lack Gemm.
    gemms = [node.name or node.output[0] for node in model.graph.node if node.op_type == "Gemm"]
    if gemms:
        logger.warning("%s: Gemm weights stay fp32 under %s: %s.", src, weights, ", ".join(gemms))


def _int8(model: onnx.ModelProto, scratch: Path, *, symmetric: bool) -> onnx.ModelProto:
    # MatMul weights: 8-bit MatMulNBits (block-wise weights; accuracy_level 4 quantizes the activation
    # per block too, see the module docstring for why not quantize_dynamic's per-tensor scale).
    model = _nbits(model, bits=8, block_size=INT8_BLOCK_SIZE, accuracy_level=4, symmetric=symmetric, gather=False)
    # Embedding tables: int8 per tensor, dequantized after the Gather (only the looked-up rows).
    out = scratch / "int8.onnx"
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=["Gather"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        # Always external: the output size is unknown here; _save decides the final layout.
        use_external_data_format=True,
        extra_options={"WeightSymmetric": symmetric},
    )
    return onnx.load(out)


def _int4(model: onnx.ModelProto, *, block_size: int, accuracy_level: int, symmetric: bool) -> onnx.ModelProto:
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
    with _root_logging_kept():  # importing the module configures logging: undo that at once
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    return MatMulNBitsQuantizer


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
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
