"""``manifest.json``: the contract between an export directory and the runtime.

The exporter writes one manifest per export directory; the runtime reads every graph file, tensor
name, dtype and symbolic dimension from it and hard-codes none of them::

    export/
      manifest.json         Manifest: versions, base model + fingerprint, quantization, profile
      device/shadow.onnx    GraphSpec(role="detached-shadow"): inputs/outputs as TensorSpecs, sha256
      device/head.onnx      GraphSpec(role="head")
      cloud/backbone.onnx   GraphSpec(role="cloud-backbone"), external data listed with its sha256
      tokenizer/...         Manifest.tokenizer_files, each with its sha256 (Manifest.tokenizer_sha256)
      device/genai_config.json, device/tokenizer.json...
                            Manifest.interop_files: what other runtimes read (onnxruntime-genai), with sha256

The graph records (:class:`~shadowpeft.runtime.contract.specs.GraphSpec`, ``TensorSpec``) and the
names in them are declared in :mod:`shadowpeft.runtime.contract`. Reading validates every key and
raises one :class:`~shadowpeft.runtime.errors.ManifestError` that lists every problem, and reads older
schema versions. The files themselves are checked against their recorded sha256 by
:func:`~shadowpeft.runtime.manifest_files.verify_files`. An export of a checkpoint with an
``escalation.json`` also carries its threshold (:class:`Escalation`, ``Manifest.escalation``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowpeft.runtime.atomic import write_atomic
from shadowpeft.runtime.contract import LOGITS, GraphSpec
from shadowpeft.runtime.contract.fields import (
    at,
    check_int,
    check_kind,
    check_path,
    check_sha256,
    check_str,
    instance_problems,
    raise_if,
    record_problems,
    shallow_values,
    show,
)
from shadowpeft.runtime.contract.specs import graph_problems
from shadowpeft.runtime.errors import ManifestError

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "Escalation",
    "Manifest",
]

MANIFEST_NAME = "manifest.json"
#: Highest manifest schema this runtime reads. Bump it (and keep reading older ones) on any change.
#: 2 added ``vocab_size``; a version-1 manifest gets it from its graphs (see :func:`legacy_vocab_size`).
#: 3 added ``tokenizer_sha256``; older manifests still open, with a warning that their tokenizer files
#: (and chat template) cannot be checked.
#: 4 added ``interop_files`` (optional: files for other runtimes, such as onnxruntime-genai's config).
#: 5 added a graph's ``fused`` (optional: the stacks written with onnxruntime's fused operators).
SCHEMA_VERSION = 5
#: The first schema version whose manifests must state ``vocab_size``.
_VOCAB_SIZE_SINCE = 2
#: The first schema version whose manifests must give every tokenizer file's sha256.
_TOKENIZER_SHA256_SINCE = 3
#: Largest escalation threshold accepted: training's "escalate everything" threshold is the float just
#: above 1.0, so no confidence reaches it; this leaves room for it and for rounding, and no more.
_THRESHOLD_MAX = 1.0000001
_FRACTIONS = (
    "tolerance",
    "local_fraction",
    "combined_accuracy",
    "attached_accuracy",
    "detached_accuracy",
    "detached_ece",
)


@dataclass(frozen=True)
class Escalation:
    """When the device answers alone and when it asks the cloud: the threshold chosen for the checkpoint.

    ``shadow-export`` copies it from the checkpoint's ``escalation.json`` (written by training or by
    ``shadowpeft eval --selective``). A step (or an example) is answered by the detached shadow when its
    confidence is at least ``threshold`` and escalated to the attached model otherwise.

    Attributes:
        confidence: Name of the confidence measure the threshold applies to: ``token-probability`` (the
            largest softmax probability of the detached shadow's logits at each step, temperature 1),
            ``first-token-probability`` or ``class-probability``.
        threshold: Answer locally when the confidence is >= this, in [0, 1]; just above 1.0 means
            "always escalate".
        tolerance: Accuracy the combined model was allowed to lose against attached.
        local_fraction: Share of the held-out examples answered locally at ``threshold``.
        combined_accuracy: Accuracy of the local / escalated mix at ``threshold``.
        attached_accuracy: Attached accuracy on the same examples.
        detached_accuracy: Detached accuracy on the same examples.
        detached_ece: Expected calibration error of the detached confidence.
        examples: Number of examples (predicted tokens, for ``token-probability``) it was chosen on.
        split: The split they came from, e.g. ``"test"``.

    Raises:
        ManifestError: On construction, listing every invalid field.
    """

    confidence: str
    threshold: float
    tolerance: float | None = None
    local_fraction: float | None = None
    combined_accuracy: float | None = None
    attached_accuracy: float | None = None
    detached_accuracy: float | None = None
    detached_ece: float | None = None
    examples: int | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        raise_if(escalation_problems(dataclasses.asdict(self), "escalation"), "Invalid Escalation")
        for name in ("threshold", *_FRACTIONS):  # JSON's 1 and 0 read back as ints; keep the floats floats
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "escalation") -> Escalation:
        """Builds the record from its JSON form; keys other than ``confidence`` and ``threshold`` may be absent.

        Raises:
            ManifestError: Listing every unknown, missing or invalid key.
        """
        raise_if(escalation_problems(data, where), f"Invalid {where}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form: every field, ``null`` for those not recorded."""
        return shallow_values(self)


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
        vocab_size: Vocabulary size of the base model (token ids are in ``[0, vocab_size)``). Required
            from schema version 2; a version-1 manifest takes it from its graphs' ``logits`` outputs
            (``None`` if none has a fixed width) and does not write it back.
        escalation: The escalation threshold of the exported checkpoint (its ``escalation.json``), or
            ``None`` when it had none; the key is then absent from ``manifest.json``.
        tokenizer_sha256: sha256 of every tokenizer file (the chat template included), by its path in
            ``tokenizer_files``. Required from schema version 3; ``None`` (and absent from the JSON) in older
            manifests, whose tokenizer files ``verify_files`` (:mod:`~shadowpeft.runtime.manifest_files`) can
            only check for presence.
        interop_files: sha256 of every file written for other runtimes, by its path in the export: e.g.
            onnxruntime-genai's ``device/genai_config.json`` and the tokenizer copies beside it (see
            ``shadowpeft.export.genai_config``). The runtime never reads them; ``verify_files`` checks them
            like the graphs. ``None`` (and absent from the JSON) when there are none, and before schema 4.

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
    vocab_size: int | None = None
    escalation: Escalation | None = None
    tokenizer_sha256: dict[str, str] | None = None
    interop_files: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer_files, list):
            object.__setattr__(self, "tokenizer_files", tuple(self.tokenizer_files))
        graphs = self.graphs.values() if isinstance(self.graphs, Mapping) else ()
        problems = instance_problems(tuple(graphs), GraphSpec, "graphs")
        if self.escalation is not None and not isinstance(self.escalation, Escalation):
            problems.append(
                f"escalation must be an Escalation or None; got {show(self.escalation)}. Build it with "
                "Escalation(...) or Escalation.from_dict(...)."
            )
        if not problems and _is_legacy(self.schema_version) and self.vocab_size is None:
            object.__setattr__(self, "vocab_size", legacy_vocab_size(self.graphs))
        if not problems:
            problems = _manifest_problems(dataclasses.asdict(self))
        raise_if(problems, "Invalid Manifest")

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
        raise_if(problems, f"Invalid {source}", fix="re-export with shadow-export, or fix these keys")
        graphs = {key: GraphSpec.from_dict(graph) for key, graph in data["graphs"].items()}
        tokenizer_files = tuple(data["tokenizer_files"])
        escalation = Escalation.from_dict(data["escalation"]) if data.get("escalation") is not None else None
        return cls(
            **{
                **data,
                "graphs": graphs,
                "tokenizer_files": tokenizer_files,
                "validation": dict(data["validation"]),
                "escalation": escalation,
                "tokenizer_sha256": None if data.get("tokenizer_sha256") is None else dict(data["tokenizer_sha256"]),
                "interop_files": None if data.get("interop_files") is None else dict(data["interop_files"]),
            }
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
        except RecursionError:  # a manifest is a few levels deep; thousands of nested brackets are not one
            raise ManifestError(
                f"{str(target)!r} nests its JSON too deeply to read (it is not a manifest shadow-export writes). "
                "The file is damaged or was edited by hand; re-export."
            ) from None
        return cls.from_dict(data, source=str(target))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form (tuples as lists)."""
        graphs = {key: graph.to_dict() for key, graph in self.graphs.items()}
        tokenizer_files = list(self.tokenizer_files)
        data = {
            **shallow_values(self),
            "graphs": graphs,
            "tokenizer_files": tokenizer_files,
            "validation": dict(self.validation),
        }
        if _is_legacy(self.schema_version):  # a version-1 reader does not know the key
            del data["vocab_size"]
        if self.escalation is None:  # absent rather than null: exports without one read as before
            del data["escalation"]
        else:
            data["escalation"] = self.escalation.to_dict()
        if self.tokenizer_sha256 is None:  # only older manifests lack it; an older reader does not know the key
            del data["tokenizer_sha256"]
        else:
            data["tokenizer_sha256"] = dict(self.tokenizer_sha256)
        if self.interop_files is None:  # absent rather than null, as for escalation
            del data["interop_files"]
        else:
            data["interop_files"] = dict(self.interop_files)
        return data

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
        write_atomic(target, text)
        return target


# --- older schema versions ------------------------------------------------------------------------


def legacy_vocab_size(graphs: Mapping[str, GraphSpec]) -> int | None:
    """How a schema-1 manifest's vocabulary size is found: the width of any graph's fixed ``logits`` output."""
    for graph in graphs.values():
        for spec in graph.outputs:
            if spec.name == LOGITS and spec.shape and isinstance(spec.shape[-1], int):
                return spec.shape[-1]
    return None


def _is_legacy(version: Any) -> bool:
    """Whether ``version`` is a valid schema version from before ``vocab_size``."""
    return isinstance(version, int) and not isinstance(version, bool) and 1 <= version < _VOCAB_SIZE_SINCE


# --- validation of the JSON form ------------------------------------------------------------------
# _manifest_problems takes JSON-shaped data and returns one message per problem, prefixed with where
# it is (graphs are checked by shadowpeft.runtime.contract.specs). Manifest runs the same function on
# dataclasses.asdict(self), so a manifest built in code (by the exporter) is held to the same rules.


def _manifest_problems(data: Any) -> list[str]:
    problems: list[str] = []
    if not record_problems(data, "", Manifest, problems):
        return problems
    if "schema_version" in data:
        check_int(data["schema_version"], "schema_version", problems, minimum=1)
    if data.get("vocab_size") is not None:
        check_int(data["vocab_size"], "vocab_size", problems, minimum=1)
    elif not _is_legacy(data.get("schema_version")):
        problems.append(
            f"missing key 'vocab_size' (required from schema_version {_VOCAB_SIZE_SINCE}). "
            "Re-export with shadow-export."
        )
    for key in ("shadowpeft_version", "base_model", "base_fingerprint", "quantization"):
        if key in data:
            check_str(data[key], key, problems)
    for key in ("base_revision", "device_profile"):
        if data.get(key) is not None:
            check_str(data[key], key, problems, optional=True)
    for key in ("num_layers", "hidden_size"):
        if key in data:
            check_int(data[key], key, problems, minimum=1)
    if "graphs" in data and check_kind(data["graphs"], "graphs", problems, array=False):
        if not data["graphs"]:
            problems.append("graphs is empty; an export has at least one graph. Re-export.")
        for key, graph in data["graphs"].items():
            if check_str(key, f"graphs key {key!r}", problems):
                problems += graph_problems(graph, f"graphs[{key!r}]")
    if "tokenizer_files" in data and check_kind(data["tokenizer_files"], "tokenizer_files", problems, array=True):
        for index, relative in enumerate(data["tokenizer_files"]):
            check_path(relative, f"tokenizer_files[{index}]", problems)
    if data.get("escalation") is not None:
        problems += escalation_problems(data["escalation"], "escalation")
    problems += _tokenizer_digest_problems(data)
    problems += _interop_problems(data.get("interop_files"))
    if "validation" in data and check_kind(data["validation"], "validation", problems, array=False):
        for metric, value in data["validation"].items():
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not is_int and not (isinstance(value, float) and math.isfinite(value)):
                problems.append(f"validation[{metric!r}] must be a finite number; got {show(value)}. Re-export.")
    return problems


def _tokenizer_digest_problems(data: Mapping[str, Any]) -> list[str]:
    """``tokenizer_sha256``: one digest per tokenizer file and no other (required from schema 3)."""
    digests = data.get("tokenizer_sha256")
    if digests is None:
        version = data.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and version >= _TOKENIZER_SHA256_SINCE:
            return [
                f"missing key 'tokenizer_sha256' (required from schema_version {_TOKENIZER_SHA256_SINCE}). "
                "Re-export with shadow-export."
            ]
        return []
    problems: list[str] = []
    if not check_kind(digests, "tokenizer_sha256", problems, array=False):
        return problems
    files = data.get("tokenizer_files")
    listed = set(files) if isinstance(files, list | tuple) and all(isinstance(f, str) for f in files) else None
    for relative, sha256 in digests.items():
        place = f"tokenizer_sha256[{relative!r}]"
        check_sha256(sha256, place, problems)
        if listed is not None and relative not in listed:
            problems.append(f"{place}: {relative!r} is not one of tokenizer_files. Re-export.")
    for relative in sorted(listed - set(digests)) if listed is not None else ():
        problems.append(f"tokenizer_sha256 has no digest for tokenizer file {relative!r}. Re-export.")
    return problems


def _interop_problems(files: Any) -> list[str]:
    """``interop_files``: an object of relative paths inside the export -> sha256 (optional)."""
    problems: list[str] = []
    if files is not None and check_kind(files, "interop_files", problems, array=False):
        for relative, sha256 in files.items():
            if check_path(relative, f"interop_files key {relative!r}", problems):
                check_sha256(sha256, f"interop_files[{relative!r}]", problems)
    return problems


def escalation_problems(data: Any, where: str) -> list[str]:
    """Every problem of an escalation record's JSON form (``Manifest.escalation``)."""
    problems: list[str] = []
    if not record_problems(data, where, Escalation, problems):
        return problems
    if "confidence" in data:
        check_str(data["confidence"], at(where, "confidence"), problems)
    if "threshold" in data and not _is_number_in(data["threshold"], 0.0, _THRESHOLD_MAX):
        problems.append(
            f"{at(where, 'threshold')} must be a finite number in [0, 1] (just above 1 for 'always escalate'); "
            f"got {show(data['threshold'])}. Choose the threshold again (shadowpeft eval --selective) and re-export."
        )
    for key in _FRACTIONS:
        if data.get(key) is not None and not _is_number_in(data[key], 0.0, 1.0):
            problems.append(f"{at(where, key)} must be a fraction in [0, 1] or null; got {show(data[key])}.")
    if data.get("examples") is not None:
        check_int(data["examples"], at(where, "examples"), problems, minimum=1)
    if data.get("split") is not None:
        check_str(data["split"], at(where, "split"), problems, optional=True)
    return problems


def _is_number_in(value: Any, low: float, high: float) -> bool:
    """A finite int or float (never a bool) in [low, high]."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return is_number and math.isfinite(value) and low <= value <= high


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or path.suffix != ".json" else path
