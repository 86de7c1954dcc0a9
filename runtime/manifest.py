"""``manifest.json``: the contract between an export directory and the runtime.

The exporter writes one manifest per export directory; the runtime reads every graph file, tensor
name, dtype and symbolic dimension from it and hard-codes none of them::

    export/
      manifest.json         Manifest: versions, base model + fingerprint, quantization, profile
      device/shadow.onnx    GraphSpec(role="detached-shadow"): inputs/outputs as TensorSpecs, sha256
      device/head.onnx      GraphSpec(role="head")
      cloud/backbone.onnx   GraphSpec(role="cloud-backbone"), external data listed with its sha256
      tokenizer.json        one of Manifest.tokenizer_files

Reading validates every key and raises one :class:`~shadowpeft.runtime.errors.ManifestError` that
lists every problem; :func:`verify_files` checks the files against their recorded sha256.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from shadowpeft.runtime.devices import WEIGHT_FORMATS, WeightFormat
from shadowpeft.runtime.errors import ManifestError, format_problems

__all__ = [
    "DTYPES",
    "MANIFEST_NAME",
    "ROLES",
    "SCHEMA_VERSION",
    "GraphRole",
    "GraphSpec",
    "Manifest",
    "TensorSpec",
    "file_sha256",
    "verify_files",
]

MANIFEST_NAME = "manifest.json"
#: Highest manifest schema this runtime reads. Bump it (and keep reading older ones) on any change.
SCHEMA_VERSION = 1

#: Tensor element types a graph input or output may have (ONNX names, lower case).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

GraphRole = Literal["detached-shadow", "head", "cloud-backbone", "coupled"]
ROLES: tuple[str, ...] = get_args(GraphRole)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
_HASH_CHUNK = 1 << 20
_LABELS = {"Manifest": "manifest", "GraphSpec": "graph", "TensorSpec": "tensor"}  # for errors at the top level


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: ONNX tensor name, e.g. ``"input_ids"`` or ``"present.0.key"``.
        dtype: Element type, one of :data:`DTYPES`.
        shape: One entry per axis: an ``int`` for a fixed size, a ``str`` for a symbolic dimension
            such as ``"batch_size"``.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        _raise_if(_tensor_problems(dataclasses.asdict(self), ""), f"Invalid TensorSpec {self.name!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Builds a tensor spec from its JSON form (``shape`` as a list).

        Raises:
            ManifestError: Listing every unknown, missing or invalid key.
        """
        _raise_if(_tensor_problems(data, ""), "Invalid tensor spec")
        return cls(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of an export and everything the runtime needs to call it.

    Attributes:
        file: Graph file, relative to the export directory, with ``/`` separators.
        role: What the graph computes, one of :data:`ROLES`.
        opset: ONNX default-domain opset the graph was exported with.
        inputs: Graph inputs in order.
        outputs: Graph outputs in order.
        weights: Weight format of the graph, one of ``fp32``, ``fp16``, ``int8``, ``int4``.
        sha256: Lower-case hex sha256 of ``file``.
        external_data: External-data files of the graph (relative path -> sha256). The runtime
            lets onnxruntime read their location from the model; this only lists them for
            :func:`verify_files` and for copying.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    file: str
    role: GraphRole
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: WeightFormat
    sha256: str
    external_data: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("inputs", "outputs"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = _instance_problems(self.inputs, TensorSpec, "inputs")
        problems += _instance_problems(self.outputs, TensorSpec, "outputs")
        if not problems:
            problems = _graph_problems(dataclasses.asdict(self), "")
        _raise_if(problems, f"Invalid GraphSpec for {self.file!r}")

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the inputs, in order."""
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs, in order."""
        return tuple(spec.name for spec in self.outputs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphSpec:
        """Builds a graph spec from its JSON form.

        Raises:
            ManifestError: Listing every unknown, missing or invalid key, nested ones included.
        """
        _raise_if(_graph_problems(data, ""), "Invalid graph spec")
        inputs = tuple(TensorSpec.from_dict(spec) for spec in data["inputs"])
        outputs = tuple(TensorSpec.from_dict(spec) for spec in data["outputs"])
        return cls(
            **{**data, "inputs": inputs, "outputs": outputs, "external_data": dict(data.get("external_data", {}))}
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form."""
        inputs = [spec.to_dict() for spec in self.inputs]
        outputs = [spec.to_dict() for spec in self.outputs]
        return {**_values(self), "inputs": inputs, "outputs": outputs, "external_data": dict(self.external_data)}


@dataclass(frozen=True)
class Manifest:
    """Everything an export directory holds and how to call it (``manifest.json``).

    Attributes:
        schema_version: Format version of this manifest (see :data:`SCHEMA_VERSION`).
        shadowpeft_version: Version of shadowpeft that wrote the export.
        base_model: The base model the adapter was trained on (hub name or path).
        base_revision: Hub revision (commit) of the base model, or ``None`` for a local path.
        base_fingerprint: Fingerprint of the base model (hash of its config and embedding/head
            weights), as recorded in the checkpoint.
        graphs: Graphs by key, e.g. ``"device/shadow"``, ``"device/head"``, ``"cloud/backbone"``.
        num_layers: Number of decoder layers of the base model.
        hidden_size: Hidden size ``d`` of the base model (also the width of ``shadow_states``).
        tokenizer_files: Tokenizer files, relative to the export directory.
        device_profile: Name of the device profile the export applied, or ``None``.
        quantization: Quantization that was applied, e.g. ``"none"`` or ``"int4-block32-acc4"``.
        validation: Parity metrics measured at export time, e.g. ``{"logits_max_abs_diff": 1e-5}``.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    schema_version: int
    shadowpeft_version: str
    base_model: str
    base_revision: str | None
    base_fingerprint: str
    graphs: dict[str, GraphSpec]
    num_layers: int
    hidden_size: int
    tokenizer_files: tuple[str, ...]
    device_profile: str | None
    quantization: str
    validation: dict[str, float]

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer_files, list):
            object.__setattr__(self, "tokenizer_files", tuple(self.tokenizer_files))
        graphs = self.graphs.values() if isinstance(self.graphs, Mapping) else ()
        problems = _instance_problems(tuple(graphs), GraphSpec, "graphs")
        if not problems:
            problems = _manifest_problems(dataclasses.asdict(self))
        _raise_if(problems, "Invalid Manifest")

    def graph(self, key: str) -> GraphSpec:
        """Returns the graph stored under ``key``.

        Raises:
            ManifestError: If the export has no such graph (the message lists the ones it has).
        """
        if key not in self.graphs:
            raise ManifestError(
                f"This export has no graph {key!r}. It has: {', '.join(sorted(self.graphs))}. "
                "Re-export with the graph you need, or pick one of these."
            )
        return self.graphs[key]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = MANIFEST_NAME) -> Manifest:
        """Builds a manifest from its JSON form, checking every key.

        Args:
            data: The parsed JSON object.
            source: Where ``data`` came from, for error messages.

        Returns:
            The validated manifest.

        Raises:
            ManifestError: For a newer ``schema_version`` (alone, since newer manifests may have
                keys this version does not know), or listing every unknown, missing or invalid key.
        """
        if isinstance(data, Mapping):
            version = data.get("schema_version")
            if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
                raise ManifestError(
                    f"{MANIFEST_NAME} has schema_version {version}; this runtime reads up to {SCHEMA_VERSION}. "
                    "Upgrade shadowpeft or re-export."
                )
        problems = _manifest_problems(data)
        _raise_if(problems, f"Invalid {source}", fix="re-export with shadow-export, or fix these keys")
        graphs = {key: GraphSpec.from_dict(graph) for key, graph in data["graphs"].items()}
        tokenizer_files = tuple(data["tokenizer_files"])
        return cls(
            **{**data, "graphs": graphs, "tokenizer_files": tokenizer_files, "validation": dict(data["validation"])}
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Manifest:
        """Reads and validates a manifest.

        Args:
            path: An export directory, or the ``manifest.json`` file itself.

        Returns:
            The validated manifest.

        Raises:
            ManifestError: If the file is missing, unreadable or not JSON, or listing every problem.
        """
        target = _manifest_path(path)
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ManifestError(
                f"No {MANIFEST_NAME} at {str(target)!r}: {str(target.parent)!r} is not a shadowpeft export "
                f"directory. Pass the directory that shadow-export wrote (it contains {MANIFEST_NAME})."
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"Cannot read {str(target)!r}: {exc}. Check its permissions, or re-export.") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{str(target)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}. "
                "The file is damaged or was edited by hand; re-export."
            ) from exc
        return cls.from_dict(data, source=str(target))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form (tuples as lists)."""
        graphs = {key: graph.to_dict() for key, graph in self.graphs.items()}
        tokenizer_files = list(self.tokenizer_files)
        return {
            **_values(self),
            "graphs": graphs,
            "tokenizer_files": tokenizer_files,
            "validation": dict(self.validation),
        }

    def write(self, path: str | Path) -> Path:
        """Writes the manifest atomically: a temp file in the same directory, then ``os.replace``.

        An interrupted write leaves either the old file or none, never a partial one.

        Args:
            path: An existing export directory, or the path of the ``manifest.json`` to write.

        Returns:
            The path written.
        """
        target = Path(path) / MANIFEST_NAME if Path(path).is_dir() else Path(path)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o644)  # mkstemp creates 0600; a manifest is meant to be shared.
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return target


def file_sha256(path: str | Path) -> str:
    """Lower-case hex sha256 of a file, read in chunks (graphs can be gigabytes).

    The exporter records it with this function and :func:`verify_files` checks it with the same one.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_files(export_dir: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Checks that every file the manifest lists exists and has its recorded sha256.

    Args:
        export_dir: The export directory.
        manifest: Its manifest if already loaded; read from ``export_dir`` otherwise.

    Returns:
        The manifest that was checked.

    Raises:
        ManifestError: Listing every missing file and every sha256 mismatch.
    """
    root = Path(export_dir)
    if manifest is None:
        manifest = Manifest.from_file(root)
    problems: list[str] = []
    for key, graph in manifest.graphs.items():
        expected = {graph.file: graph.sha256, **graph.external_data}
        for relative, sha256 in expected.items():
            problem = _digest_problem(root, relative, sha256)
            if problem:
                problems.append(f"graphs[{key!r}]: {problem}")
    for relative in manifest.tokenizer_files:
        if not (root / relative).is_file():
            problems.append(f"tokenizer_files: {relative!r} is missing ({root / relative}).")
    if problems:
        header = (
            f"Files in {str(root)!r} do not match its {MANIFEST_NAME} ({_count(problems)}); the export is "
            "incomplete or was modified. Copy the whole directory again, or re-export:"
        )
        raise ManifestError(format_problems(header, problems), problems=problems)
    return manifest


# --- validation of the JSON form ------------------------------------------------------------------
# Each *_problems function takes JSON-shaped data (dicts, lists or tuples, scalars) and returns one
# message per problem, prefixed with where it is (e.g. "graphs['device/shadow'].inputs[0].dtype").
# The dataclasses run the same functions on dataclasses.asdict(self), so a manifest built in code
# (by the exporter) is held to the same rules as one read from disk.


def _tensor_problems(data: Any, where: str) -> list[str]:
    problems: list[str] = []
    if not _record(data, where, TensorSpec, problems):
        return problems
    if "name" in data:
        _check_str(data["name"], _at(where, "name"), problems)
    if "dtype" in data:
        _check_choice(data["dtype"], _at(where, "dtype"), problems, allowed=DTYPES, what="a supported dtype")
    if "shape" in data and _check_kind(data["shape"], _at(where, "shape"), problems, array=True):
        for axis, dim in enumerate(data["shape"]):
            is_size = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not is_size and not (isinstance(dim, str) and dim.strip()):
                problems.append(
                    f"{_at(where, 'shape')}[{axis}] must be a size >= 0 or a symbolic dimension name such as "
                    f"'batch_size'; got {dim!r}."
                )
    return problems


def _graph_problems(data: Any, where: str) -> list[str]:
    problems: list[str] = []
    if not _record(data, where, GraphSpec, problems):
        return problems
    if "file" in data:
        _check_path(data["file"], _at(where, "file"), problems)
    if "role" in data:
        _check_choice(data["role"], _at(where, "role"), problems, allowed=ROLES, what="a graph role")
    if "opset" in data:
        _check_int(data["opset"], _at(where, "opset"), problems, minimum=1)
    names: dict[str, list[str]] = {}
    for kind in ("inputs", "outputs"):
        if kind not in data or not _check_kind(data[kind], _at(where, kind), problems, array=True):
            continue
        if not data[kind]:
            problems.append(f"{_at(where, kind)} is empty; a graph has at least one. Re-export.")
        for index, spec in enumerate(data[kind]):
            problems += _tensor_problems(spec, f"{_at(where, kind)}[{index}]")
            if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
                names.setdefault(spec["name"], []).append(f"{kind}[{index}]")
    for name, places in names.items():
        if len(places) > 1:
            problems.append(
                f"{where or 'graph'}: tensor name {name!r} is used {len(places)} times ({', '.join(places)}); "
                "names must be unique within a graph. Re-export."
            )
    if "weights" in data:
        _check_choice(data["weights"], _at(where, "weights"), problems, allowed=WEIGHT_FORMATS, what="a weight format")
    if "sha256" in data:
        _check_sha256(data["sha256"], _at(where, "sha256"), problems)
    if "external_data" in data and _check_kind(
        data["external_data"], _at(where, "external_data"), problems, array=False
    ):
        for relative, sha256 in data["external_data"].items():
            place = f"{_at(where, 'external_data')}[{relative!r}]"
            _check_path(relative, place, problems)
            _check_sha256(sha256, place, problems)
    return problems


def _manifest_problems(data: Any) -> list[str]:
    problems: list[str] = []
    if not _record(data, "", Manifest, problems):
        return problems
    if "schema_version" in data:
        _check_int(data["schema_version"], "schema_version", problems, minimum=1)
    for key in ("shadowpeft_version", "base_model", "base_fingerprint", "quantization"):
        if key in data:
            _check_str(data[key], key, problems)
    for key in ("base_revision", "device_profile"):
        if data.get(key) is not None:
            _check_str(data[key], key, problems, optional=True)
    for key in ("num_layers", "hidden_size"):
        if key in data:
            _check_int(data[key], key, problems, minimum=1)
    if "graphs" in data and _check_kind(data["graphs"], "graphs", problems, array=False):
        if not data["graphs"]:
            problems.append("graphs is empty; an export has at least one graph. Re-export.")
        for key, graph in data["graphs"].items():
            if _check_str(key, f"graphs key {key!r}", problems):
                problems += _graph_problems(graph, f"graphs[{key!r}]")
    if "tokenizer_files" in data and _check_kind(data["tokenizer_files"], "tokenizer_files", problems, array=True):
        for index, relative in enumerate(data["tokenizer_files"]):
            _check_path(relative, f"tokenizer_files[{index}]", problems)
    if "validation" in data and _check_kind(data["validation"], "validation", problems, array=False):
        for metric, value in data["validation"].items():
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not is_int and not (isinstance(value, float) and math.isfinite(value)):
                problems.append(f"validation[{metric!r}] must be a finite number; got {_show(value)}. Re-export.")
    return problems


def _record(data: Any, where: str, cls: type, problems: list[str]) -> bool:
    """Checks that ``data`` is an object with exactly ``cls``'s fields as keys."""
    label = where or _LABELS[cls.__name__]
    if not isinstance(data, Mapping):
        problems.append(f"{label} must be a JSON object; got {_show(data)}. Re-export.")
        return False
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            problems.append(
                f"{label}: unknown key {key!r}. Allowed keys: {', '.join(names)}. Remove it, or "
                "upgrade shadowpeft if a newer version wrote this export."
            )
    for f in fields:
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in data and not has_default:  # keys with a default may be omitted
            problems.append(f"{label}: missing key {f.name!r}. Re-export with shadow-export.")
    return True


def _check_str(value: Any, where: str, problems: list[str], *, optional: bool = False) -> bool:
    if isinstance(value, str) and value.strip():
        return True
    allowed = "a non-empty string or null" if optional else "a non-empty string"
    problems.append(f"{where} must be {allowed}; got {_show(value)}.")
    return False


def _check_int(value: Any, where: str, problems: list[str], *, minimum: int) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return True
    problems.append(f"{where} must be an integer >= {minimum}; got {_show(value)}.")
    return False


def _check_kind(value: Any, where: str, problems: list[str], *, array: bool) -> bool:
    if isinstance(value, list | tuple) if array else isinstance(value, Mapping):
        return True
    problems.append(f"{where} must be {'an array' if array else 'an object'}; got {_show(value)}.")
    return False


def _check_choice(value: Any, where: str, problems: list[str], *, allowed: tuple[str, ...], what: str) -> bool:
    if not _check_str(value, where, problems):
        return False
    if value in allowed:
        return True
    problems.append(f"{where} {value!r} is not {what}. Allowed: {', '.join(allowed)}. Re-export, or fix the value.")
    return False


def _check_path(value: Any, where: str, problems: list[str]) -> bool:
    if not _check_str(value, where, problems):
        return False
    parts = PurePosixPath(value).parts
    if "\\" in value or value.startswith("/") or _WINDOWS_DRIVE.match(value) or ".." in parts or not parts:
        problems.append(
            f"{where} must be a relative path inside the export directory, with '/' separators and no '..'; "
            f"got {value!r}. Re-export."
        )
        return False
    return True


def _check_sha256(value: Any, where: str, problems: list[str]) -> bool:
    if isinstance(value, str) and _SHA256.fullmatch(value):
        return True
    problems.append(f"{where} must be a sha256 digest (64 lower-case hex digits); got {_show(value)}. Re-export.")
    return False


def _instance_problems(items: Any, cls: type, where: str) -> list[str]:
    """For objects built in code: nested records must be dataclass instances, not raw dicts."""
    if not isinstance(items, list | tuple):
        return [f"{where} must be a tuple of {cls.__name__}; got {_show(items)}."]
    return [
        f"{where}[{index}] must be a {cls.__name__}; got {_show(item)}. Build it with {cls.__name__}(...) "
        f"or {cls.__name__}.from_dict(...)."
        for index, item in enumerate(items)
        if not isinstance(item, cls)
    ]


def _digest_problem(root: Path, relative: str, expected: str) -> str | None:
    path = root / relative
    if not path.is_file():
        return f"file {relative!r} is missing ({path})."
    actual = file_sha256(path)
    if actual != expected:
        return f"file {relative!r} has sha256 {actual}, but the manifest records {expected}."
    return None


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or path.suffix != ".json" else path


def _raise_if(problems: list[str], what: str, *, fix: str = "fix these fields") -> None:
    if problems:
        header = f"{what} ({_count(problems)}); {fix}:"
        raise ManifestError(format_problems(header, problems), problems=problems)


def _values(record: Any) -> dict[str, Any]:
    """A dataclass's fields, shallow (``dataclasses.asdict`` would also convert nested records)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _count(problems: list[str]) -> str:
    return "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
