"""Tracing one graph wrapper to an ONNX file with ``torch.onnx.export`` (the dynamo exporter).

Every input axis is traced as dynamic (``Dim.AUTO``), so the exporter works out which axes are
equal (batch everywhere, past + new = total); afterwards the graph's inputs and outputs are given
the names and symbolic dimensions that :mod:`shadowpeft.runtime.contract` declares, so the ONNX file,
the manifest and the runtime agree on one contract.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir
import onnx_ir.passes.common as common_passes
import torch
from onnxscript import optimizer
from torch import Tensor, nn
from torch.export import Dim

from shadowpeft.export.errors import ExportError
from shadowpeft.export.fused_ops import TRANSLATIONS
from shadowpeft.runtime.contract import GraphIO, TensorSpec

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "export_graph", "external_data_files"]

DEFAULT_OPSET = 18
#: Graphs whose weights exceed this many bytes keep them in ``<file>.data`` (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Fold constants (e.g. a weight's transpose) whatever their size: weights are what must be folded.
_FOLD_LIMIT = 1 << 40

_TRACER_PREFIX = "pkg.torch."  # metadata keys the torch exporter writes for debugging


def export_graph(
    wrapper: nn.Module,
    example: Sequence[Tensor],
    graph_io: GraphIO,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> None:
    """Trace ``wrapper`` on ``example`` and write the ONNX graph to ``path``.

    Args:
        wrapper: A flat-tensor module (:mod:`shadowpeft.export.graphs`) in eval mode.
        example: Positional example inputs, in ``graph_io.inputs`` order. Use sizes >= 2 on every
            dynamic axis: the tracer specialises axes of size 0 or 1.
        graph_io: Declared inputs and outputs; their names and symbolic dimensions are written
            into the graph.
        path: Output ``.onnx`` file. Weights go to ``<name>.data`` beside it when they exceed
            ``external_data_threshold`` bytes.
        opset: ONNX default-domain opset.
        external_data_threshold: See :data:`EXTERNAL_DATA_THRESHOLD`.

    Raises:
        ExportError: When tracing fails, or the traced graph disagrees with ``graph_io``.
    """
    if len(example) != len(graph_io.inputs):
        raise ExportError(f"{path.name}: {len(example)} example inputs for {len(graph_io.inputs)} declared inputs.")
    weight_bytes = sum(t.numel() * t.element_size() for t in wrapper.state_dict().values())
    external = weight_bytes > external_data_threshold
    dynamic = _dynamic_shapes(wrapper, example)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                wrapper,
                tuple(example),
                dynamo=True,
                input_names=[spec.name for spec in graph_io.inputs],
                output_names=[spec.name for spec in graph_io.outputs],
                dynamic_shapes=dynamic,
                opset_version=opset,
                optimize=False,  # see _optimize
                custom_translation_table=TRANSLATIONS,  # the fused layers' operators (export.fused_ops)
                verbose=False,
            )
        except Exception as err:  # the exporter raises many types; all mean "could not trace"
            raise ExportError(
                f"torch.onnx.export could not trace {path.name}: {type(err).__name__}: {_first_line(err)}. "
                "This architecture or configuration may use an operation the exporter does not support."
            ) from err
        _optimize(program.model)
        program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)
    _declare(model, graph_io, path.name)
    _strip_tracer_metadata(model)
    onnx.save_model(model, str(path))


def _strip_tracer_metadata(model: onnx.ModelProto) -> None:
    """Drops what the tracer records for debugging (``pkg.torch.*``: each node's Python stack trace with the
    absolute paths of this machine's source files, FX node names, the exported program's signature): it
    does nothing at run time, leaks the build machine's paths, and makes the same export from another
    checkout differ byte for byte."""
    for node in model.graph.node:
        kept = [prop for prop in node.metadata_props if not prop.key.startswith(_TRACER_PREFIX)]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        node.doc_string = ""
    for holder in (model.graph, model):
        kept = [prop for prop in holder.metadata_props if not prop.key.startswith(_TRACER_PREFIX)]
        del holder.metadata_props[:]
        holder.metadata_props.extend(kept)


def _optimize(model: onnx_ir.Model) -> None:
    """onnxscript's optimizer without its pattern-rewrite pass.

    The exporter's own ``optimize=True`` also runs every default rewrite rule against every node,
    which took over half of the export time for a 30-layer model (minutes on 2 cores) and changes
    little in these graphs. Constant folding is what matters here: it turns the transposed
    ``nn.Linear`` weights into plain MatMul initializers that quantizers can see.
    """
    common_passes.InlinePass()(model)
    for _ in range(2):  # a fold can expose another (e.g. a Shape of a folded Reshape)
        optimizer.fold_constants(
            model, onnx_shape_inference=True, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT
        )
        common_passes.RemoveUnusedNodesPass()(model)
    onnx_ir.passes.Sequential(
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def _dynamic_shapes(wrapper: nn.Module, example: Sequence[Tensor]) -> tuple[Any, ...]:
    """Every axis ``Dim.AUTO``, shaped like ``forward``'s signature (``*past`` as one nested tuple)."""
    fixed = [p for p in inspect.signature(wrapper.forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    shapes = [{axis: Dim.AUTO for axis in range(t.dim())} for t in example]
    return (*shapes[: len(fixed)], tuple(shapes[len(fixed) :])) if len(shapes) > len(fixed) else tuple(shapes)


def external_data_files(path: Path) -> tuple[str, ...]:
    """Names (relative to the graph's folder) of the external-data files a graph references."""
    model = onnx.load(str(path), load_external_data=False)
    locations: dict[str, None] = {}
    for tensor in _initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {item.key: item.value for item in tensor.external_data}
            locations[entry["location"]] = None
    return tuple(locations)


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attribute.g)


def _declare(model: onnx.ModelProto, graph_io: GraphIO, name: str) -> None:
    """Give graph inputs/outputs the declared symbolic names; check names, ranks and fixed sizes."""
    problems: list[str] = []
    for kind, values, specs in (
        ("input", model.graph.input, graph_io.inputs),
        ("output", model.graph.output, graph_io.outputs),
    ):
        actual = [value.name for value in values]
        wanted = [spec.name for spec in specs]
        if actual != wanted:
            problems.append(f"{kind}s are {actual}, declared {wanted}")
            continue
        for value, spec in zip(values, specs, strict=True):
            problems += _declare_value(value, spec)
    if problems:
        raise ExportError(f"{name}: the traced graph does not match its declared I/O: " + "; ".join(problems))


def _declare_value(value: onnx.ValueInfoProto, spec: TensorSpec) -> list[str]:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != len(spec.shape):
        return [f"{spec.name} has rank {len(dims)}, declared {len(spec.shape)}"]
    problems = []
    for axis, (dim, declared) in enumerate(zip(dims, spec.shape, strict=True)):
        if isinstance(declared, str):
            dim.dim_param = declared
        elif dim.HasField("dim_value") and dim.dim_value != declared:
            problems.append(f"{spec.name} axis {axis} is {dim.dim_value}, declared {declared}")
        else:
            dim.dim_value = declared
    return problems


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and warnings; our own progress display names the stage."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
