"""A Triton Inference Server model repository for the cloud graph of an export (``shadow-triton``).

Triton (onnxruntime backend) serves ``cloud/backbone`` to many devices and keeps each device's base
KV cache as *implicit state* of its sequence (``sequence_id``)::

    <out>/README.md, <model_name>/config.pbtxt, <model_name>/1/model.onnx (+ its external data)

    request of a sequence:  input_ids, shadow_states, attention_mask, position_ids  (device)
                            + past_key_values.* = state (Triton; empty [kv_heads, 0, head_dim] at start)
                         -> hidden_states (device) + present.* -> state for the next request (Triton)

The config is checked before anything is written: parsed with the ``ModelConfig`` schema that
``tritonclient`` ships, and every name, element type and fixed dimension compared with the graph.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import re
import shutil
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, NamedTuple

import onnx
from google.protobuf import text_encoding, text_format

from shadowpeft import __version__
from shadowpeft.export.bundle import check_destination, staging_directory
from shadowpeft.export.errors import ExportError
from shadowpeft.runtime.contract import (
    BATCH,
    CLOUD_BACKBONE,
    GRAPH_ROLES,
    KV_KINDS,
    MODEL_NAME,
    GraphSpec,
    TensorSpec,
    past_key_name,
    present_key_name,
)
from shadowpeft.runtime.errors import ManifestError
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import verify_files

__all__ = [
    "CLOUD_GRAPH",
    "DEFAULT_MAX_SEQUENCES",
    "DEFAULT_MAX_SEQUENCE_IDLE_US",
    "DEFAULT_MODEL_NAME",
    "model_config_schema",
    "parse_model_config",
    "write_triton_repository",
]

CLOUD_GRAPH = CLOUD_BACKBONE
DEFAULT_MODEL_NAME = MODEL_NAME
#: A device that sends nothing for this long loses its sequence (and KV cache); it re-prefills.
DEFAULT_MAX_SEQUENCE_IDLE_US = 60_000_000
#: Sequences (devices) one model instance holds at once; more wait in Triton's backlog.
DEFAULT_MAX_SEQUENCES = 64
CONFIG_NAME = "config.pbtxt"
MODEL_FILE = "model.onnx"
README_NAME = "README.md"

# Manifest dtype -> (Triton config type, ONNX element type).
_TYPES = {
    "float32": ("TYPE_FP32", onnx.TensorProto.FLOAT),
    "float16": ("TYPE_FP16", onnx.TensorProto.FLOAT16),
    "bfloat16": ("TYPE_BF16", onnx.TensorProto.BFLOAT16),
    "int64": ("TYPE_INT64", onnx.TensorProto.INT64),
    "int32": ("TYPE_INT32", onnx.TensorProto.INT32),
    "int8": ("TYPE_INT8", onnx.TensorProto.INT8),
    "uint8": ("TYPE_UINT8", onnx.TensorProto.UINT8),
    "bool": ("TYPE_BOOL", onnx.TensorProto.BOOL),
}
_ONNX_TYPES = dict(_TYPES.values())
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class _State(NamedTuple):
    """A KV input fed back from its output: Triton stores ``present`` and passes it as ``past``."""

    past: TensorSpec
    present: TensorSpec


def write_triton_repository(
    export_dir: Path,
    out: Path,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    max_batch_size: int = 8,
    instances: int = 1,
    max_sequences: int = DEFAULT_MAX_SEQUENCES,
    max_sequence_idle_us: int = DEFAULT_MAX_SEQUENCE_IDLE_US,
    overwrite: bool = False,
) -> Path:
    """Writes a Triton model repository serving the export's ``cloud/backbone`` graph; returns ``out``.

    Args:
        export_dir: A directory written by ``shadow-export --split`` (it has ``cloud/backbone``).
        out: The repository directory to create (pass it to ``tritonserver --model-repository``).
        model_name: Triton model name: the folder under ``out`` and the name in request URLs.
        max_batch_size: Most requests (one sequence each) Triton runs as one batch.
        instances: Model instances (onnxruntime sessions); each runs one batch at a time.
        max_sequences: Sequences one instance holds at once (``oldest.max_candidate_sequences``).
        max_sequence_idle_us: Idle time after which Triton drops a sequence and its KV cache.
        overwrite: Replace an existing ``out``.

    Raises:
        ExportError: The export is missing, invalid or has no cloud graph; the graph disagrees with
            its manifest; the config does not parse with Triton's schema; ``out`` exists (without
            ``overwrite``) or contains the export.
        ValueError: A count < 1 or an invalid model name.
    """
    sizes = {"max_batch_size": max_batch_size, "instances": instances, "max_sequences": max_sequences}
    _check_options(model_name, **sizes, max_sequence_idle_us=max_sequence_idle_us)
    export_dir, out = Path(export_dir), Path(out)
    source, target = export_dir.resolve(), out.resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ExportError(
            f"The repository {str(out)!r} and the export {str(export_dir)!r} overlap; writing (or --overwrite) "
            "would mix or delete the export. Choose an output directory outside the export."
        )
    check_destination(out, overwrite=overwrite)  # before hashing gigabytes in verify_files
    manifest, graph = _cloud_graph(export_dir)
    states = _states(graph, manifest.num_layers)
    text = _config_text(manifest, graph, states, model_name, *sizes.values(), max_sequence_idle_us)
    config = parse_model_config(text)
    model = onnx.load(str(export_dir / graph.file), load_external_data=False)
    _raise(f"config.pbtxt disagrees with {export_dir / graph.file}", _graph_problems(config, model))
    data_files = _data_files(graph, model)
    with staging_directory(out, overwrite=overwrite) as root:
        version = root / model_name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(export_dir / graph.file, version / MODEL_FILE)
        for path, name in data_files.items():
            (version / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(export_dir / path, version / name)
        (root / model_name / CONFIG_NAME).write_text(text, encoding="utf-8")
        (root / README_NAME).write_text(_readme(manifest, graph, states, model_name, max_sequences), encoding="utf-8")
    return out


@functools.cache
def model_config_schema() -> ModuleType:
    """Triton's ``model_config_pb2`` as ``tritonclient`` ships it, loaded by path.

    ``import tritonclient.grpc`` needs grpcio; this reads ``tritonclient/grpc/model_config_pb2.py``
    alone, which needs only protobuf.

    Raises:
        ExportError: tritonclient is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec("tritonclient")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "grpc" / "model_config_pb2.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("_shadowpeft_triton_model_config_pb2", path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    raise ExportError(
        "Checking a Triton config needs the ModelConfig schema from tritonclient "
        f"(tritonclient/grpc/model_config_pb2.py); searched {locations or 'nowhere: tritonclient is not installed'}. "
        "Install it: pip install 'tritonclient[http]==2.73.0'."
    )


def parse_model_config(text: str) -> Any:
    """Parses ``config.pbtxt`` text into Triton's ``inference.ModelConfig``; ExportError if it does not parse."""
    config = model_config_schema().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise ExportError(f"config.pbtxt does not parse as Triton's ModelConfig: {err}. This is a bug.") from err
    return config


def _check_options(name: str, **counts: int) -> None:
    bad = [f"{key}={value!r}" for key, value in counts.items() if isinstance(value, bool) or value < 1]
    if bad:
        raise ValueError(f"Triton repository options must be integers >= 1; got {', '.join(bad)}.")
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"Invalid Triton model name {name!r}: it names a folder and request URLs. Use letters, digits, "
            f"'_', '.' and '-', e.g. {MODEL_NAME!r}."
        )


def _cloud_graph(export_dir: Path) -> tuple[Manifest, GraphSpec]:
    """The manifest and its cloud graph, whose files are checked (a server may hold only those)."""
    try:
        manifest = Manifest.from_file(export_dir)
        graph = manifest.graphs.get(CLOUD_GRAPH)
        if graph is not None:
            digests = None if manifest.tokenizer_sha256 is None else {}
            cloud_only = dataclasses.replace(
                manifest, graphs={CLOUD_GRAPH: graph}, tokenizer_files=(), tokenizer_sha256=digests, interop_files=None
            )
            verify_files(export_dir, cloud_only)
    except ManifestError as err:
        raise ExportError(f"Cannot use {str(export_dir)!r} as an export: {err}") from err
    if graph is None or graph.role != GRAPH_ROLES[CLOUD_GRAPH]:
        raise ExportError(
            f"The export {str(export_dir)!r} has no cloud graph {CLOUD_GRAPH!r} (it has: "
            f"{', '.join(sorted(manifest.graphs))}); Triton serves the cloud half of a split export. "
            "Re-export with: shadow-export CHECKPOINT --split."
        )
    return manifest, graph


def _states(graph: GraphSpec, num_layers: int) -> tuple[_State, ...]:
    """Pairs every ``past_key_values.{i}.key|value`` input with its ``present`` output; checks shapes."""
    outputs = {spec.name: spec for spec in graph.outputs}
    pairs = {past_key_name(i, k): present_key_name(i, k) for i in range(num_layers) for k in KV_KINDS}
    states, problems = [], []
    for past in graph.inputs:
        if past.name not in pairs:
            continue
        present = outputs.get(pairs[past.name])
        if present is None:
            problems.append(f"input {past.name!r} has no output {pairs[past.name]!r} to carry it to the next step")
            continue
        states.append(_State(past, present))
        problems += _state_shape_problems(past, present)
    if len(states) != len(pairs) and not problems:
        problems.append(f"{len(states)} KV inputs for {num_layers} layers; expected {len(pairs)}")
    for spec in (*graph.inputs, *graph.outputs):
        if not spec.shape or spec.shape[0] != BATCH:
            problems.append(f"{spec.name!r} has shape {list(spec.shape)}; Triton batches on a first axis {BATCH!r}")
    _raise(f"The {CLOUD_GRAPH!r} graph cannot be served with Triton implicit state; re-export", problems)
    return tuple(states)


def _state_shape_problems(past: TensorSpec, present: TensorSpec) -> list[str]:
    symbolic = [i for i, dim in enumerate(past.shape[1:]) if isinstance(dim, str)]
    if past.dtype != present.dtype or len(past.shape) != len(present.shape) or len(symbolic) != 1:
        return [f"{past.name!r} {past.dtype}{list(past.shape)} cannot be state for {present.name!r}"]
    fixed = [(a, b) for a, b in zip(past.shape[1:], present.shape[1:], strict=True) if not isinstance(a, str)]
    if any(a != b for a, b in fixed):
        return [f"{past.name!r} {list(past.shape)} and {present.name!r} {list(present.shape)} differ in a fixed axis"]
    return []


def _config_text(manifest, graph, states, name, max_batch_size, instances, max_sequences, idle_us) -> str:
    state_names = {state.past.name for state in states} | {state.present.name for state in states}
    lines = [
        f"# {CLOUD_GRAPH} of {manifest.base_model}; written by shadow-triton (shadowpeft {__version__}).",
        f"# Graph sha256 {graph.sha256}. ../{README_NAME} says how devices call it.",
        f"name: {_quote(name)}",
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        *_io_block("input", [spec for spec in graph.inputs if spec.name not in state_names]),
        *_io_block("output", [spec for spec in graph.outputs if spec.name not in state_names]),
        "# KV cache as implicit state, empty at a sequence's start. No control inputs (the graph has none)."
        "\n# 'oldest' batches only real requests of equal shapes, hence of equal cache lengths.",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {idle_us}",
        f"  oldest {{ max_candidate_sequences: {max_sequences} max_queue_delay_microseconds: 0 }}",
        "  state [",
    ]
    for index, (past, present) in enumerate(states):
        dtype = _TYPES[past.dtype][0]
        lines += [
            "    {",
            f"      input_name: {_quote(past.name)} output_name: {_quote(present.name)}",
            f"      data_type: {dtype} dims: {_dims(past.shape[1:], -1)}",
            f"      initial_state: {{ name: {_quote('empty ' + past.name)} data_type: {dtype} "
            f"dims: {_dims(past.shape[1:], 0)} zero_data: true }}",
            "    }" + ("," if index < len(states) - 1 else ""),
        ]
    lines += ["  ]", "}", f"instance_group [ {{ count: {instances} }} ]", ""]
    return "\n".join(lines)


def _io_block(key: str, specs: list[TensorSpec]) -> list[str]:
    lines = [f"{key} ["]
    for index, spec in enumerate(specs):
        dims = _dims(spec.shape[1:], -1)
        comma = "," if index < len(specs) - 1 else ""
        lines.append(f"  {{ name: {_quote(spec.name)} data_type: {_TYPES[spec.dtype][0]} dims: {dims} }}{comma}")
    return [*lines, "]"]


def _dims(shape: tuple[int | str, ...], symbolic: int) -> str:
    """A Triton ``dims`` list: fixed sizes as they are, each symbolic one as ``symbolic``."""
    return "[ " + ", ".join(str(symbolic if isinstance(dim, str) else dim) for dim in shape) + " ]"


def _quote(text: str) -> str:
    return '"' + text_encoding.CEscape(text, as_utf8=True) + '"'


def _graph_problems(config: Any, model: onnx.ModelProto) -> list[str]:
    """What Triton's onnxruntime backend would refuse: names, types, ranks and fixed dims vs the graph."""
    inputs = {v.name: v for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}}
    outputs = {value.name: value for value in model.graph.output}
    type_name = model_config_schema().DataType.Name
    wanted_in = [(io.name, type_name(io.data_type), list(io.dims)) for io in config.input]
    wanted_out = [(io.name, type_name(io.data_type), list(io.dims)) for io in config.output]
    problems = []
    for state in config.sequence_batching.state:
        wanted_in.append((state.input_name, type_name(state.data_type), list(state.dims)))
        wanted_out.append((state.output_name, type_name(state.data_type), list(state.dims)))
        for initial in state.initial_state:  # as Triton's GenerateInitialStateData checks it
            fixed = [(a, b) for a, b in zip(initial.dims, state.dims, strict=False) if b != -1]
            if len(initial.dims) != len(state.dims) or -1 in initial.dims or any(a != b for a, b in fixed):
                problems.append(f"initial_state dims {list(initial.dims)} do not fit state dims {list(state.dims)}")
    for where, wanted, values in (("input", wanted_in, inputs), ("output", wanted_out, outputs)):
        for name, dtype, dims in wanted:
            value = values.get(name)
            if value is None:
                problems.append(f"{where} {name!r} is not a graph {where}")
                continue
            tensor = value.type.tensor_type
            if _ONNX_TYPES.get(dtype) != tensor.elem_type:
                onnx_type = onnx.TensorProto.DataType.Name(tensor.elem_type)
                problems.append(f"{where} {name!r} is {dtype} in the config but {onnx_type} in the graph")
            graph_dims = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
            if graph_dims[:1] != [-1] or len(graph_dims) != len(dims) + 1:
                problems.append(f"{where} {name!r}: graph shape {graph_dims} is not [batch, *{dims}]")
            elif any(g != -1 and g != c for g, c in zip(graph_dims[1:], dims, strict=True)):
                problems.append(f"{where} {name!r}: config dims {dims} contradict graph shape {graph_dims}")
    missing = sorted(set(inputs) - {name for name, _, _ in wanted_in})
    if missing:
        problems.append(f"graph inputs {missing} are neither config inputs nor states; Triton would refuse the model")
    return problems


def _data_files(graph: GraphSpec, model: onnx.ModelProto) -> dict[str, str]:
    """External-data files: path in the export -> name beside model.onnx (the location the graph references)."""
    folder = PurePosixPath(graph.file).parent
    listed = {PurePosixPath(path).relative_to(folder).as_posix(): path for path in graph.external_data}
    referenced = set()
    for tensor in _initializers(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            referenced.add(next(entry.value for entry in tensor.external_data if entry.key == "location"))
    problems = [f"the graph references {name!r}; the manifest does not list it" for name in referenced - set(listed)]
    problems += [f"the manifest lists {name!r}; the graph does not reference it" for name in set(listed) - referenced]
    if MODEL_FILE in referenced:
        problems.append(f"external data named {MODEL_FILE!r} would collide with the model file Triton loads")
    _raise(f"External data of {graph.file} is inconsistent; re-export", problems)
    return {path: name for name, path in sorted(listed.items())}


def _initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                yield from _initializers(subgraph)


def _raise(header: str, problems: list[str]) -> None:
    if problems:
        raise ExportError("\n".join([f"{header}:", *(f"  - {problem}" for problem in problems)]))


def _readme(manifest: Manifest, graph: GraphSpec, states: tuple[_State, ...], name: str, sequences: int) -> str:
    kept = {state.past.name for state in states} | {state.present.name for state in states}
    item = {"float16": 2, "bfloat16": 2}.get(states[0].past.dtype, 4)
    per_token = sum(item * math.prod(d for d in s.past.shape[1:] if isinstance(d, int)) for s in states)
    inputs = ", ".join(f"`{spec.name}`" for spec in graph.inputs if spec.name not in kept)
    output = next(spec.name for spec in graph.outputs if spec.name not in kept)
    values = {"name": name, "base": manifest.base_model, "inputs": inputs, "output": output, "sequences": sequences}
    return _README.format(**values, kib=per_token / 1024, layers=len(states) // 2, version=__version__)


_README = """\
# Triton model repository: `{name}`, the cloud half of a ShadowPEFT split of {base}

Written by `shadow-triton` (shadowpeft {version}). `{name}/1/model.onnx` is the export's
`cloud/backbone.onnx`, unchanged; `{name}/config.pbtxt` serves it with the onnxruntime backend.

## Run (drop `--gpus all` to run on CPU; `--log-verbose=1` shows how requests are batched)

    docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -v $PWD:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models

## How a device talks to it: KServe v2 / Open Inference Protocol

`POST /v2/models/{name}/infer`, one Triton *sequence* per device session: request parameters
`sequence_id` (unique per session), `sequence_start: true` on the first request, `sequence_end: true`
on the last (or let it idle out). Inputs, batch 1: {inputs}; output `{output}` (final-normed;
the device runs `device/head` on it). Use binary tensors (`binary_data_size` per input,
`binary_data: true` on the output), e.g. `tritonclient.http`: `client.infer("{name}", inputs,
outputs=[InferRequestedOutput("{output}", binary_data=True)], sequence_id=session,
sequence_start=first, sequence_end=last)`.

The base KV cache never crosses the network: Triton keeps it as implicit state, feeding each
`present.*` output back as the next `past_key_values.*` input, from an empty cache at the start
({layers} layers, {kib:.1f} KiB per cached token per session). The device still sends
`attention_mask` and `position_ids`: with P tokens already sent and T new ones, P + T ones and
P, ..., P + T - 1. A prompt may be sent in chunks, one request each.

## Differences from `shadow-serve`

- `shadow-serve` builds mask and positions from its own session cache; here the device counts P.
- A sequence idle past `max_sequence_idle_microseconds` is dropped with its cache: the next request
  fails unless it sets `sequence_start`, so the device re-prefills.
- An instance holds {sequences} sequences; further ones wait in a backlog until one ends or idles out.
- No bearer tokens or per-session token limits: use `--http-restricted-api` or an authenticating
  proxy, and cap the context on the device.
- Only requests of equal shapes (same T and P) are batched; add instances for parallelism.

The server sees token ids and the shadow states `s0`; only detached mode keeps content on the device.
"""
