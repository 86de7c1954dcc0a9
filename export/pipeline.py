"""``shadow-export``'s work, stage by stage: load, trace, export, validate, quantize, write.

The graphs are traced from :func:`~shadowpeft.export.graphs.export_view` (fused layers where the
architecture allows, otherwise eager attention; one injection weight per layer) and validated against
the model as it is (its own attention implementation), so parity also covers the difference.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from shadowpeft import __version__
from shadowpeft.export.bundle import check_destination, graph_files, staging_directory, write_tokenizer
from shadowpeft.export.device_tokenizer import copy_tokenizer_files
from shadowpeft.export.errors import ExportError
from shadowpeft.export.fused_layers import Fusion, plan_fusion
from shadowpeft.export.genai_config import write_genai_folder
from shadowpeft.export.graphs import export_view
from shadowpeft.export.loading import LoadedCheckpoint, load_checkpoint, read_escalation
from shadowpeft.export.onnx_export import DEFAULT_OPSET, export_graph, external_data_files
from shadowpeft.export.optimum_config import write_optimum_folder
from shadowpeft.export.ort_format import convert_to_ort
from shadowpeft.export.plan import GraphJob, graph_jobs, keys_for
from shadowpeft.export.quality import memory_figures, quantized_agreement
from shadowpeft.export.quantize import (
    FORMATS,
    FP32,
    QuantizationParams,
    WeightFormatPass,
    quantize_graph,
    weight_format,
)
from shadowpeft.export.validate import FP32_LOGIT_TOLERANCE, check_parity
from shadowpeft.runtime.contract import (
    CLOUD_BACKBONE,
    DEVICE_SHADOW,
    GRAPH_ROLES,
    ORT_KEY_PREFIX,
    GraphSpec,
    ort_copy_key,
)
from shadowpeft.runtime.devices import DeviceProfile
from shadowpeft.runtime.manifest import SCHEMA_VERSION, Escalation, Manifest
from shadowpeft.runtime.manifest_files import file_sha256

__all__ = [
    "STAGES",
    "ExportOptions",
    "export_checkpoint",
    "graph_opset",
    "quantization_name",
    "quantize_export",
]

STAGES = ("load", "trace", "export", "validate", "quantize", "write")
Progress = Callable[[str, str], None]  # (stage, detail)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how (the CLI's options).

    Attributes:
        selections: Any of ``detached``, ``split``, ``coupled`` (see :data:`~shadowpeft.export.plan.SELECTIONS`).
        weights: A registered weight format (``fp32``, ``int8`` or ``int4``) for the on-device graphs;
            ``None`` takes the profile's (``fp32`` without a profile). The cloud graph stays fp32.
        profile: Device profile: int4 parameters, memory budget, ORT format.
        opset: ONNX opset.
        base: Base model overriding the checkpoint's reference.
        overwrite: Replace an existing output directory.
        tolerance: Largest allowed |logit difference| between fp32 graphs and PyTorch.
        steps: Cached decode steps of the parity check.
        ops: ``auto`` (onnxruntime's fused operators for every decoder stack that allows them),
            ``fused`` (the same, failing for a stack that does not) or ``standard`` (standard ONNX
            operators only, for providers without onnxruntime's contrib operators).
        quantize_cloud: Quantize ``cloud/backbone`` too, to the device graphs' weight format (by default
            it stays fp32; quantized, the server's memory and speed follow the device graphs' format).
    """

    selections: tuple[str, ...] = ("split",)
    weights: str | None = None
    profile: DeviceProfile | None = None
    opset: int = DEFAULT_OPSET
    base: str | None = None
    overwrite: bool = False
    tolerance: float = FP32_LOGIT_TOLERANCE
    steps: int = 8
    ops: str = "auto"
    quantize_cloud: bool = False

    def quantizes(self, job: GraphJob) -> bool:
        """Whether ``job``'s graph is quantized (when the weight format quantizes at all)."""
        return job.on_device or self.quantize_cloud

    @property
    def weight_format(self) -> str:
        if self.weights is not None:
            return self.weights
        return self.profile.weights if self.profile is not None else FP32


def export_checkpoint(
    checkpoint: Path, out: Path, options: ExportOptions, *, progress: Progress | None = None
) -> Manifest:
    """Exports ``checkpoint`` into the directory ``out`` and returns its manifest.

    The checkpoint's ``escalation.json``, if it has one, becomes the manifest's ``escalation``.

    Raises:
        ExportError: Any stage failed (the message names it); nothing is left at ``out``.
        CheckpointError, AssetError: The checkpoint or its base cannot be loaded.
    """
    report = progress or (lambda stage, detail: None)
    keys = keys_for(options.selections)
    weights = options.weight_format
    if weights not in FORMATS:
        raise ExportError(f"Weight format {weights!r} is not supported by shadow-export; use {', '.join(FORMATS)}.")
    fmt = weight_format(weights)
    # The profile's quantization parameters travel from here, once; the format checks them now,
    # before anything is loaded, and the manifest records what the quantizer wrote.
    if options.quantize_cloud and not fmt.quantizes:
        raise ExportError(
            "--quantize-cloud quantizes cloud/backbone to the device graphs' weight format, which is fp32 here; "
            "pass --quantize int8 or int4 (or a --device profile that sets one)."
        )
    if options.quantize_cloud and CLOUD_BACKBONE not in keys:
        raise ExportError("--quantize-cloud: this export writes no cloud graph; add --split.")
    requested = QuantizationParams.from_profile(options.profile)
    quantization = fmt.manifest_name(fmt.parameters(requested))
    check_destination(out, overwrite=options.overwrite)
    report("load", str(checkpoint))
    escalation = read_escalation(checkpoint)  # a malformed file stops the export before the slow stages
    loaded = load_checkpoint(checkpoint, base=options.base)
    fusion = plan_fusion(loaded.model, options.ops)
    with staging_directory(out, overwrite=options.overwrite) as root, _scratch(root) as scratch:
        report("trace", f"{', '.join(keys)}; {fusion.describe()}")
        jobs = graph_jobs(loaded.model, keys)
        fp32_root = scratch if fmt.quantizes else root
        with export_view(loaded.model, fusion), torch.no_grad():
            for job in jobs:
                job.wrapper(*job.example)  # fails here, with a PyTorch traceback, before the exporter runs
            for job in jobs:
                report("export", job.file)
                target = _fp32_path(job, root, fp32_root, options)
                target.parent.mkdir(parents=True, exist_ok=True)
                export_graph(job.wrapper, job.example, job.io, target, opset=options.opset)
        report("validate", f"prefill + {options.steps} cached steps")
        figures = _validate(loaded.model, jobs, root, fp32_root, options)
        if fmt.quantizes:
            quantization, quantized = _quantize(loaded, jobs, root, fp32_root, fmt, requested, report, options)
            figures.update(quantized)
        report("write", str(out))
        manifest = _manifest(loaded, jobs, root, weights, quantization, options, figures, escalation, fusion)
        if options.profile is not None and options.profile.ort_format:
            manifest = _with_ort_copies(manifest, jobs, root)
        manifest.write(root)
    return manifest


@contextlib.contextmanager
def _scratch(root: Path) -> Iterator[Path]:
    """A folder for the fp32 graphs of a quantized export, inside the staging directory ``root``.

    Deleted before the export is published; if the process is killed, it goes with the staging
    directory, which the next export to the same place removes.
    """
    path = Path(tempfile.mkdtemp(prefix=".scratch-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _fp32_path(job: GraphJob, root: Path, fp32_root: Path, options: ExportOptions) -> Path:
    """Where the fp32 graph of ``job`` is written: the scratch folder when it will be quantized."""
    return (fp32_root if options.quantizes(job) else root) / job.file


def _validate(model, jobs: list[GraphJob], root: Path, fp32_root: Path, options: ExportOptions) -> dict[str, float]:
    sessions = {job.key: _session(_fp32_path(job, root, fp32_root, options)) for job in jobs}
    ios = {job.key: job.io for job in jobs}
    results = check_parity(model, sessions, ios, steps=options.steps, tolerance=options.tolerance)
    figures: dict[str, float] = {}
    for result in results:
        figures[f"{result.chain}.logits_max_abs_diff"] = result.max_abs_diff
        figures[f"{result.chain}.logits_bound"] = result.bound(options.tolerance)
        figures[f"{result.chain}.greedy_agreement"] = result.greedy_agreement
    figures["parity.tolerance"] = options.tolerance
    figures["parity.cached_steps"] = options.steps
    return figures


def _quantize(
    loaded: LoadedCheckpoint,
    jobs: list[GraphJob],
    root: Path,
    fp32_root: Path,
    fmt: WeightFormatPass,
    requested: QuantizationParams,
    report: Progress,
    options: ExportOptions,
) -> tuple[str, dict[str, float]]:
    """Quantizes the on-device graphs (and the cloud graph with ``--quantize-cloud``); returns the manifest's
    ``quantization`` (the quantizer's answer) and figures."""
    figures: dict[str, float] = {}
    names = set()
    for job in jobs:
        if not options.quantizes(job):
            continue
        report("quantize", f"{job.file} -> {fmt.name}")
        result = quantize_graph(
            fp32_root / job.file,
            root / job.file,
            weights=fmt.name,
            block_size=requested.block_size,
            accuracy_level=requested.accuracy_level,
        )
        figures[f"{job.key}.fp32_bytes"] = result.bytes_before
        figures[f"{job.key}.quantized_matmuls"] = result.quantized_matmuls
        names.add(result.quantization)
    if len(names) != 1:
        raise ExportError(f"The graphs were quantized differently ({', '.join(sorted(names))}); report this.")
    fp32 = {job.key: _session(_fp32_path(job, root, fp32_root, options)) for job in jobs}
    quantized = {job.key: _session(root / job.file) for job in jobs}
    ios = {job.key: job.io for job in jobs}
    figures.update(quantized_agreement(fp32, quantized, ios, loaded.tokenizer, prefix=fmt.name))
    return names.pop(), figures


def _manifest(
    loaded: LoadedCheckpoint,
    jobs: list[GraphJob],
    root: Path,
    weights: str,
    quantization: str,
    options: ExportOptions,
    figures: dict[str, float],
    escalation: Escalation | None,
    fusion: Fusion,
) -> Manifest:
    graphs = {}
    device_bytes = 0
    for job in jobs:
        sha, data, size = graph_files(root, job.file, external_data_files(root / job.file))
        graph_weights = weights if options.quantizes(job) else FP32
        opset = graph_opset(root / job.file)  # quantizers may raise it (int4 embeddings need 21)
        graphs[job.key] = GraphSpec(
            job.file,
            job.role,
            opset,
            job.io.inputs,
            job.io.outputs,
            graph_weights,
            sha,
            data,
            fusion.in_graph(job.key),
        )
        figures[f"{job.key}.bytes"] = size
        device_bytes += size if job.on_device else 0
    if options.profile is not None:
        figures.update(memory_figures(loaded.model, device_bytes, options.profile))
    tokenizer_files = write_tokenizer(loaded.tokenizer, root)
    model = loaded.model
    return Manifest(
        schema_version=SCHEMA_VERSION,
        shadowpeft_version=__version__,
        base_model=loaded.base_model,
        base_revision=None,
        base_fingerprint=loaded.base_fingerprint,
        graphs=graphs,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        tokenizer_files=tokenizer_files,
        device_profile=options.profile.name if options.profile is not None else None,
        quantization=quantization,
        validation=figures,
        vocab_size=model.base.get_output_embeddings().weight.shape[0],
        escalation=escalation,
        tokenizer_sha256={relative: file_sha256(root / relative) for relative in tokenizer_files},
        interop_files=_interop_files(root, graphs.get(DEVICE_SHADOW), loaded, tokenizer_files, options.profile),
    )


def _interop_files(
    root: Path,
    device: GraphSpec | None,
    loaded: LoadedCheckpoint,
    tokenizer_files: tuple[str, ...],
    profile: DeviceProfile | None,
) -> dict[str, str] | None:
    """Writes what other runtimes read beside the detached shadow graph ``device``; their sha256 by path.

    onnxruntime-genai and Optimum read one folder: the tokenizer copies are written once for both, then
    each runtime's configs. ``None`` (nothing written) for an export without a detached shadow graph.
    """
    if device is None:
        return None
    return {
        **copy_tokenizer_files(root, device, tokenizer_files),
        **write_genai_folder(root, device, loaded.model, loaded.tokenizer, profile=profile),
        **write_optimum_folder(root, device, loaded.model, loaded.tokenizer),
    }


def _with_ort_copies(manifest: Manifest, jobs: list[GraphJob], root: Path) -> Manifest:
    """Adds an ``.ort`` copy of every on-device graph under ``ort/<key>`` (same I/O and weights)."""
    graphs, figures = dict(manifest.graphs), dict(manifest.validation)
    for job in jobs:
        if job.on_device:
            copy = graphs[ort_copy_key(job.key)] = _ort_copy(graphs[job.key], root)
            figures[f"{ort_copy_key(job.key)}.bytes"] = (root / copy.file).stat().st_size
    return replace(manifest, graphs=graphs, validation=figures)


def _ort_copy(graph: GraphSpec, root: Path) -> GraphSpec:
    """Converts ``graph`` (a file under ``root``) to ``.ort`` and returns the copy's spec (same I/O and weights)."""
    path = convert_to_ort(root / graph.file)
    return replace(graph, file=path.relative_to(root).as_posix(), sha256=file_sha256(path), external_data={})


def graph_opset(path: Path) -> int:
    """The default-domain opset a graph file declares (quantizers may raise it: int4 embeddings need 21).

    Reads only the graph's header, not its external data.
    """
    model = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def quantize_export(src: Path, dst: Path, *, weights: str, cloud: bool = False) -> Manifest:
    """Writes to ``dst`` a copy of the fp32 export ``src`` whose on-device graphs are quantized to ``weights``.

    The quantize and write stages of :func:`export_checkpoint` on an existing export, for comparing
    weight formats of one set of graphs: the on-device graphs (every role but ``cloud-backbone``)
    go through :func:`~shadowpeft.export.quantize.quantize_graph` with its default parameters; the
    manifest gets their new sha256s, weight format, opsets and ``quantization`` name. Their ``.ort``
    copies, if the export has them, are converted again from the quantized graphs. Unlike
    ``shadow-export`` it does not re-run the agreement check against fp32.

    Args:
        src: An export directory with fp32 on-device graphs.
        dst: The directory to write; must not exist.
        weights: ``int8`` or ``int4``.
        cloud: Quantize ``cloud/backbone`` too (``shadow-export --quantize-cloud``).

    Returns:
        The manifest written to ``dst``.
    """
    manifest = Manifest.from_file(src)
    copies = [key for key in manifest.graphs if key.startswith(ORT_KEY_PREFIX)]
    targets = {  # the graphs to quantize: on-device ones, and cloud/backbone with ``cloud``
        key: spec.file
        for key, spec in manifest.graphs.items()
        if (cloud or spec.role != GRAPH_ROLES[CLOUD_BACKBONE]) and key not in copies
    }
    skipped = {Path(manifest.graphs[key].file).name for key in copies} | {Path(f).name for f in targets.values()}
    skipped |= {n for f in targets.values() for n in external_data_files(src / f)}
    shutil.copytree(src, dst, ignore=lambda folder, names: [n for n in names if n in skipped])
    graphs = dict(manifest.graphs)
    for key, spec in manifest.graphs.items():
        if key not in targets:
            continue
        quantize_graph(src / spec.file, dst / spec.file, weights=weights)
        sha, data, _ = graph_files(dst, spec.file, external_data_files(dst / spec.file))
        graphs[key] = replace(
            spec, weights=weights, sha256=sha, external_data=data, opset=graph_opset(dst / spec.file)
        )
    for key in copies:  # an .ort copy of an fp32 graph would be stale: convert the quantized graph again
        graphs[key] = _ort_copy(graphs[key.removeprefix(ORT_KEY_PREFIX)], dst)
    manifest = replace(manifest, graphs=graphs, quantization=quantization_name(weights))
    manifest.write(dst)
    return manifest


def quantization_name(weights: str, profile: DeviceProfile | None = None) -> str:
    """The manifest's ``quantization`` that ``weights`` under ``profile`` asks for, e.g. ``int8-block64-acc4``.

    An export records what its quantizer wrote instead (the same unless the quantizer overrode a parameter).
    """
    fmt = weight_format(weights)
    return fmt.manifest_name(fmt.parameters(QuantizationParams.from_profile(profile)))
