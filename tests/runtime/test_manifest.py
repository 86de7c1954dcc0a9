"""Tests for shadowpeft.runtime.manifest: the export-runtime contract (manifest.json)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from shadowpeft.runtime.contract import DTYPES, ROLES, GraphSpec, TensorSpec
from shadowpeft.runtime.errors import ManifestError
from shadowpeft.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Escalation, Manifest
from shadowpeft.runtime.manifest_files import export_file, file_sha256, verify_files

SHA_A = "a" * 64
SHA_EMPTY_OBJECT = hashlib.sha256(b"{}").hexdigest()  # what _export_dir writes into each tokenizer file


def _tensor(name: str, dtype: str = "float32", shape: list[Any] | None = None) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape if shape is not None else ["batch_size", "sequence_length"]}


def _graph(file: str, role: str, sha256: str = SHA_A) -> dict[str, Any]:
    return {
        "file": file,
        "role": role,
        "opset": 17,
        "inputs": [_tensor("input_ids", "int64"), _tensor("past_key_values.0.key", shape=["batch_size", 2, "p", 16])],
        "outputs": [_tensor("logits", shape=["batch_size", "sequence_length", 128]), _tensor("present.0.key")],
        "weights": "fp32",
        "sha256": sha256,
        "external_data": {},
    }


@pytest.fixture
def data() -> dict[str, Any]:
    """A valid manifest in its JSON form, with two graphs."""
    return {
        "schema_version": SCHEMA_VERSION,
        "shadowpeft_version": "0.1.0",
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "base_revision": None,
        "base_fingerprint": "sha256:" + "b" * 64,
        "graphs": {
            "device/shadow": _graph("device/shadow.onnx", "detached-shadow"),
            "device/head": _graph("device/head.onnx", "head"),
        },
        "num_layers": 30,
        "hidden_size": 576,
        "tokenizer_files": ["tokenizer.json"],
        "device_profile": "arm64-phone",
        "quantization": "int4-block32-acc4",
        "validation": {"logits_max_abs_diff": 1.5e-5, "greedy_token_agreement": 1},
        "vocab_size": 128,
        "tokenizer_sha256": {"tokenizer.json": SHA_EMPTY_OBJECT},
    }


def _problems(data: dict[str, Any]) -> tuple[str, ...]:
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert info.value.problems, "a validation error must list its problems"
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def _one_problem(data: dict[str, Any]) -> str:
    problems = _problems(data)
    assert len(problems) == 1, problems
    return problems[0]


def _export_dir(tmp_path: Path, data: dict[str, Any]) -> Path:
    """Writes every file the manifest lists, with matching sha256, and the manifest itself."""
    for graph in data["graphs"].values():
        path = tmp_path / graph["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(graph["file"].encode())
        graph["sha256"] = hashlib.sha256(graph["file"].encode()).hexdigest()
    for name in data["tokenizer_files"]:
        (tmp_path / name).write_text("{}")
    Manifest.from_dict(data).write(tmp_path)
    return tmp_path


# --- records ---------------------------------------------------------------------------------------


def test_round_trip_dict(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_records_are_frozen_with_tuples(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    graph = manifest.graph("device/shadow")
    assert isinstance(graph.inputs, tuple) and isinstance(graph.inputs[0], TensorSpec)
    assert graph.inputs[1].shape == ("batch_size", 2, "p", 16)
    assert manifest.tokenizer_files == ("tokenizer.json",)
    assert graph.input_names == ("input_ids", "past_key_values.0.key")
    assert graph.output_names == ("logits", "present.0.key")
    with pytest.raises(AttributeError):
        manifest.num_layers = 2  # type: ignore[misc]


def test_external_data_is_optional(data: dict[str, Any]) -> None:
    del data["graphs"]["device/head"]["external_data"]
    assert Manifest.from_dict(data).graph("device/head").external_data == {}


def test_graph_lookup_names_available_graphs(data: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match=r"no graph 'cloud/backbone'\. It has: device/head, device/shadow"):
        Manifest.from_dict(data).graph("cloud/backbone")


def test_constants() -> None:
    assert MANIFEST_NAME == "manifest.json"
    assert SCHEMA_VERSION == 5
    assert DTYPES == ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
    assert ROLES == ("detached-shadow", "head", "cloud-backbone", "coupled")


def test_construction_in_code_is_validated() -> None:
    with pytest.raises(ManifestError, match=r"dtype 'float64' is not a supported dtype"):
        TensorSpec("x", "float64", ("batch_size",))
    spec = TensorSpec("x", "float32", ["batch_size", 4])  # type: ignore[arg-type]
    assert spec.shape == ("batch_size", 4)
    with pytest.raises(ManifestError, match=r"inputs\[0\] must be a TensorSpec; got \{"):
        GraphSpec("g.onnx", "head", 17, ({"name": "x"},), (spec,), "fp32", SHA_A)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=r"role 'shadow' is not a graph role"):
        GraphSpec("g.onnx", "shadow", 17, (spec,), (TensorSpec("y", "float32", ()),), "fp32", SHA_A)  # type: ignore[arg-type]


def test_a_graphs_fused_stacks_round_trip_and_are_checked(data: dict[str, Any]) -> None:
    graph = data["graphs"]["device/shadow"]
    assert "fused" not in graph and GraphSpec.from_dict(graph).fused == ()  # a standard graph, as before schema 5
    fused = GraphSpec.from_dict({**graph, "fused": ["shadow"]})
    assert fused.fused == ("shadow",) and fused.to_dict()["fused"] == ["shadow"]
    assert "fused" not in GraphSpec.from_dict(graph).to_dict()  # absent rather than empty
    with pytest.raises(ManifestError, match=r"fused\[0\] 'attention' is not a decoder stack"):
        GraphSpec.from_dict({**graph, "fused": ["attention"]})
    with pytest.raises(ManifestError, match=r"fused names a stack twice"):
        GraphSpec.from_dict({**graph, "fused": ["base", "base"]})
    with pytest.raises(ManifestError, match=r"fused must be"):
        GraphSpec.from_dict({**graph, "fused": "shadow"})


def test_manifest_in_code_requires_graph_specs(data: dict[str, Any]) -> None:
    values = {**Manifest.from_dict(data).__dict__, "graphs": {"g": data["graphs"]["device/head"]}}
    with pytest.raises(ManifestError, match=r"graphs\[0\] must be a GraphSpec"):
        Manifest(**values)


def test_tensor_and_graph_from_dict(data: dict[str, Any]) -> None:
    raw = data["graphs"]["device/shadow"]
    assert GraphSpec.from_dict(raw).to_dict() == raw
    assert TensorSpec.from_dict(raw["inputs"][0]) == TensorSpec(
        "input_ids", "int64", ("batch_size", "sequence_length")
    )
    with pytest.raises(ManifestError, match=r"unknown key 'axes'"):
        TensorSpec.from_dict({**raw["inputs"][0], "axes": []})


# --- validation: every problem, collected --------------------------------------------------------


def test_unknown_top_level_key_is_named_with_allowed_keys(data: dict[str, Any]) -> None:
    data["adapter"] = "x"
    problem = _one_problem(data)
    assert "unknown key 'adapter'" in problem
    assert "Allowed keys: schema_version, shadowpeft_version, base_model" in problem


def test_unknown_nested_key(data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["inputs"][0]["layout"] = "NCHW"
    problem = _one_problem(data)
    assert problem.startswith(
        "graphs['device/head'].inputs[0]: unknown key 'layout'. Allowed keys: name, dtype, shape"
    )


@pytest.mark.parametrize("key", ["base_fingerprint", "graphs", "device_profile", "validation"])
def test_missing_key(data: dict[str, Any], key: str) -> None:
    del data[key]
    assert f"missing key {key!r}" in _one_problem(data)


def test_missing_graph_key(data: dict[str, Any]) -> None:
    del data["graphs"]["device/shadow"]["sha256"]
    assert _one_problem(data).startswith("graphs['device/shadow']: missing key 'sha256'")


def test_newer_schema_version_is_reported_alone(data: dict[str, Any]) -> None:
    data["schema_version"] = SCHEMA_VERSION + 1
    data["something_new"] = {"a": 1}  # a newer writer may add keys: they must not drown the real cause
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data)
    assert str(info.value) == (
        f"manifest.json has schema_version {SCHEMA_VERSION + 1}; this runtime reads up to {SCHEMA_VERSION}. "
        "Upgrade shadowpeft or re-export."
    )


@pytest.mark.parametrize("version", [0, -1, "1", True, 1.0])
def test_bad_schema_version(data: dict[str, Any], version: Any) -> None:
    data["schema_version"] = version
    assert _one_problem(data).startswith(f"schema_version must be an integer >= 1; got {version!r}")


def test_bad_dtype_lists_allowed(data: dict[str, Any]) -> None:
    data["graphs"]["device/shadow"]["outputs"][0]["dtype"] = "float64"
    problem = _one_problem(data)
    assert problem.startswith("graphs['device/shadow'].outputs[0].dtype 'float64' is not a supported dtype")
    assert "Allowed: float32, float16, bfloat16, int64, int32, int8, uint8, bool" in problem


def test_bad_role_lists_allowed(data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["role"] = "shadow"
    problem = _one_problem(data)
    assert "graphs['device/head'].role 'shadow' is not a graph role" in problem
    assert "Allowed: detached-shadow, head, cloud-backbone, coupled" in problem


def test_bad_weights(data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["weights"] = "q4_0"
    assert "weights 'q4_0' is not a weight format. Allowed: fp32, fp16, int8, int4" in _one_problem(data)


def test_duplicate_tensor_names_within_a_graph(data: dict[str, Any]) -> None:
    graph = data["graphs"]["device/shadow"]
    graph["outputs"][1]["name"] = "input_ids"
    problem = _one_problem(data)
    assert "tensor name 'input_ids' is used 2 times (inputs[0], outputs[1])" in problem
    assert "unique within a graph" in problem


def test_same_tensor_name_in_different_graphs_is_fine(data: dict[str, Any]) -> None:
    assert Manifest.from_dict(data).graph("device/head").inputs[0].name == "input_ids"


@pytest.mark.parametrize(
    ("dim", "ok"), [(0, True), (16, True), ("batch_size", True), (-1, False), ("", False), (1.5, False), (None, False)]
)
def test_shape_dims(data: dict[str, Any], dim: Any, ok: bool) -> None:
    data["graphs"]["device/head"]["inputs"][0]["shape"] = ["batch_size", dim]
    if ok:
        Manifest.from_dict(data)
    else:
        assert _one_problem(data).startswith("graphs['device/head'].inputs[0].shape[1] must be a size >= 0")


@pytest.mark.parametrize(
    "file", ["/abs/shadow.onnx", "../shadow.onnx", "device/../../x.onnx", "C:/x.onnx", "a\\b.onnx"]
)
def test_graph_file_must_stay_inside_the_export(data: dict[str, Any], file: str) -> None:
    data["graphs"]["device/head"]["file"] = file
    assert "must be a relative path inside the export directory" in _one_problem(data)


@pytest.mark.parametrize("digest", ["A" * 64, "a" * 63, "", 5])
def test_bad_sha256(data: dict[str, Any], digest: Any) -> None:
    data["graphs"]["device/head"]["sha256"] = digest
    assert "sha256 must be a sha256 digest (64 lower-case hex digits)" in _one_problem(data)


def test_bad_external_data(data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["external_data"] = {"../weights.data": "nope"}
    problems = _problems(data)
    assert len(problems) == 2
    assert "relative path" in problems[0] and "sha256 digest" in problems[1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.1", None, True])
def test_validation_metrics_must_be_finite_numbers(data: dict[str, Any], value: Any) -> None:
    data["validation"]["cosine"] = value
    assert _one_problem(data).startswith("validation['cosine'] must be a finite number")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num_layers", 0, "num_layers must be an integer >= 1; got 0 (int)"),
        ("hidden_size", "576", "hidden_size must be an integer >= 1; got '576' (str)"),
        ("base_model", "", "base_model must be a non-empty string; got ''"),
        ("base_revision", 3, "base_revision must be a non-empty string or null; got 3"),
        ("device_profile", ["x"], "device_profile must be a non-empty string or null"),
        ("graphs", {}, "graphs is empty; an export has at least one graph"),
        ("graphs", [], "graphs must be an object; got []"),
        ("tokenizer_files", "tokenizer.json", "tokenizer_files must be an array"),
        ("validation", [], "validation must be an object"),
    ],
)
def test_bad_values(data: dict[str, Any], key: str, value: Any, expected: str) -> None:
    data[key] = value
    assert _one_problem(data).startswith(expected)


def test_graph_needs_inputs_and_outputs(data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["outputs"] = []
    assert _one_problem(data).startswith("graphs['device/head'].outputs is empty")


def test_not_an_object() -> None:
    assert _one_problem([1, 2]).startswith("manifest must be a JSON object; got [1, 2] (list)")  # type: ignore[arg-type]


def test_every_problem_is_reported_at_once(data: dict[str, Any]) -> None:
    data["extra"] = 1
    del data["hidden_size"]
    data["graphs"]["device/shadow"]["inputs"][0]["dtype"] = "int4"
    data["graphs"]["device/shadow"]["role"] = "draft"
    data["graphs"]["device/head"]["outputs"][0]["name"] = "input_ids"
    data["validation"]["x"] = "high"
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(data, source="/exports/a/manifest.json")
    message = str(info.value)
    assert message.startswith("Invalid /exports/a/manifest.json (6 problems); re-export with shadow-export")
    assert len(info.value.problems) == 6
    assert message.count("\n  - ") == 6


# --- files -----------------------------------------------------------------------------------------


def test_write_and_read_back(tmp_path: Path, data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    written = manifest.write(tmp_path)
    assert written == tmp_path / MANIFEST_NAME
    assert written.read_text().endswith("}\n")
    assert json.loads(written.read_text()) == data
    assert Manifest.from_file(tmp_path) == manifest
    assert Manifest.from_file(written) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]  # no temp file left behind
    assert (written.stat().st_mode & 0o777) == 0o644


def test_write_to_explicit_file_path(tmp_path: Path, data: dict[str, Any]) -> None:
    target = tmp_path / "other.json"
    assert Manifest.from_dict(data).write(target) == target
    assert Manifest.from_file(target) == Manifest.from_dict(data)


def test_interrupted_write_keeps_the_old_file(tmp_path: Path, data: dict[str, Any], monkeypatch) -> None:
    old = Manifest.from_dict(data)
    old.write(tmp_path)
    data["num_layers"] = 31
    new = Manifest.from_dict(data)

    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    from shadowpeft.runtime import atomic

    monkeypatch.setattr(atomic.os, "replace", fail_replace)  # the one atomic writer the manifest uses
    with pytest.raises(OSError, match="disk full"):
        new.write(tmp_path)
    monkeypatch.undo()
    assert Manifest.from_file(tmp_path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_missing_manifest_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_file(tmp_path)
    message = str(info.value)
    assert message.startswith(f"No manifest.json at {str(tmp_path / MANIFEST_NAME)!r}")
    assert f"{str(tmp_path)!r} is not a shadowpeft export directory" in message
    with pytest.raises(ManifestError, match="is not a shadowpeft export directory"):
        Manifest.from_file(tmp_path / "no-such-export")


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text('{"schema_version": 1,,}')
    with pytest.raises(ManifestError, match=r"is not valid JSON: Expecting .* at line 1 column 22\..*re-export"):
        Manifest.from_file(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ManifestError, match="Cannot read"):
        Manifest.from_file(tmp_path)


def test_from_file_names_the_file_in_validation_errors(tmp_path: Path, data: dict[str, Any]) -> None:
    data["graphs"]["device/head"]["role"] = "bad"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"^Invalid {tmp_path / MANIFEST_NAME} \(1 problem\)"):
        Manifest.from_file(tmp_path)


def test_newer_schema_version_from_file(tmp_path: Path, data: dict[str, Any]) -> None:
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    expected = rf"^manifest.json has schema_version {SCHEMA_VERSION + 1}; this runtime reads up to {SCHEMA_VERSION}\."
    with pytest.raises(ManifestError, match=expected):
        Manifest.from_file(tmp_path)


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    payload = os.urandom(3 * (1 << 20) + 7)  # spans several read chunks
    path.write_bytes(payload)
    assert file_sha256(path) == hashlib.sha256(payload).hexdigest()


def test_verify_files_passes(tmp_path: Path, data: dict[str, Any]) -> None:
    export = _export_dir(tmp_path, data)
    assert verify_files(export) == Manifest.from_file(export)


def test_verify_files_reports_every_mismatch_and_missing_file(tmp_path: Path, data: dict[str, Any]) -> None:
    data = copy.deepcopy(data)
    data["graphs"]["device/head"]["external_data"] = {"device/head.onnx.data": SHA_A}
    export = _export_dir(tmp_path, data)
    (export / "device" / "shadow.onnx").write_bytes(b"tampered")
    (export / "device" / "head.onnx").unlink()
    (export / "tokenizer.json").unlink()
    with pytest.raises(ManifestError) as info:
        verify_files(export)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("graphs['device/shadow']: file 'device/shadow.onnx' has sha256 ")
    assert f"but the manifest records {data['graphs']['device/shadow']['sha256']}" in problems[0]
    assert problems[1].startswith("graphs['device/head']: file 'device/head.onnx' is missing")
    assert problems[2].startswith("graphs['device/head']: file 'device/head.onnx.data' is missing")
    assert problems[3].startswith("tokenizer_files: 'tokenizer.json' is missing")
    assert str(info.value).startswith(f"Files in {str(export)!r} do not match its manifest.json (4 problems)")


def test_verify_files_with_loaded_manifest(tmp_path: Path, data: dict[str, Any]) -> None:
    export = _export_dir(tmp_path, data)
    manifest = Manifest.from_file(export)
    (export / MANIFEST_NAME).unlink()  # not read again when given
    assert verify_files(export, manifest) is manifest


# --- schema versions: vocab_size (2) and manifests written before it (1) ---------------------------


def test_vocab_size_is_required_from_schema_2(data: dict[str, Any]) -> None:
    del data["vocab_size"]
    assert _one_problem(data).startswith("missing key 'vocab_size' (required from schema_version 2)")


@pytest.mark.parametrize("vocab", [0, "128", 1.5, True])
def test_bad_vocab_size(data: dict[str, Any], vocab: Any) -> None:
    data["vocab_size"] = vocab
    assert _one_problem(data).startswith(f"vocab_size must be an integer >= 1; got {vocab!r}")


def test_schema_1_manifest_takes_vocab_size_from_its_logits(data: dict[str, Any]) -> None:
    del data["vocab_size"]
    data["schema_version"] = 1
    manifest = Manifest.from_dict(data)
    assert manifest.vocab_size == 128  # the width of device/shadow's logits
    assert manifest.to_dict() == data  # written back as schema 1, without the key it did not have
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_schema_1_manifest_without_fixed_logits_has_no_vocab_size(data: dict[str, Any]) -> None:
    del data["vocab_size"]
    data["schema_version"] = 1
    for graph in data["graphs"].values():
        graph["outputs"][0]["shape"] = ["batch_size", "sequence_length", "vocab"]
    assert Manifest.from_dict(data).vocab_size is None


def test_schema_1_manifest_from_file(tmp_path: Path, data: dict[str, Any]) -> None:
    del data["vocab_size"]
    data["schema_version"] = 1
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    assert Manifest.from_file(tmp_path).vocab_size == 128


# --- escalation: the threshold the exported checkpoint chose (optional) ------------------------------

ESCALATION = {
    "confidence": "token-probability",
    "threshold": 0.625,
    "tolerance": 0.01,
    "local_fraction": 0.5,
    "combined_accuracy": 0.75,
    "attached_accuracy": 0.76,
    "detached_accuracy": 0.6,
    "detached_ece": 0.05,
    "examples": 1200,
    "split": "test",
}


def test_without_escalation_the_key_stays_absent(data: dict[str, Any]) -> None:
    manifest = Manifest.from_dict(data)
    assert manifest.escalation is None and "escalation" not in manifest.to_dict()
    assert Manifest.from_dict({**data, "escalation": None}).escalation is None


def test_escalation_round_trips_through_the_file(tmp_path: Path, data: dict[str, Any]) -> None:
    data["escalation"] = dict(ESCALATION)
    manifest = Manifest.from_dict(data)
    assert manifest.escalation == Escalation(**ESCALATION)
    assert manifest.escalation.threshold == 0.625 and manifest.escalation.confidence == "token-probability"
    assert manifest.to_dict() == data
    manifest.write(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["escalation"] == ESCALATION
    assert Manifest.from_file(tmp_path) == manifest


def test_escalation_needs_only_confidence_and_threshold(data: dict[str, Any]) -> None:
    data["escalation"] = {"confidence": "class-probability", "threshold": 1}
    escalation = Manifest.from_dict(data).escalation
    assert escalation == Escalation("class-probability", 1.0) and isinstance(escalation.threshold, float)
    assert escalation.examples is None and escalation.split is None
    always = Escalation("token-probability", math.nextafter(1.0, 2.0))  # training's "escalate everything"
    assert always.threshold > 1.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("threshold", 1.5, "escalation.threshold must be a finite number in [0, 1]"),
        ("threshold", -0.1, "escalation.threshold must be a finite number in [0, 1]"),
        ("threshold", float("nan"), "escalation.threshold must be a finite number in [0, 1]"),
        ("threshold", "0.5", "escalation.threshold must be a finite number in [0, 1]"),
        ("threshold", True, "escalation.threshold must be a finite number in [0, 1]"),
        ("confidence", "", "escalation.confidence must be a non-empty string; got ''"),
        ("confidence", 3, "escalation.confidence must be a non-empty string; got 3"),
        ("local_fraction", 1.2, "escalation.local_fraction must be a fraction in [0, 1] or null; got 1.2"),
        ("examples", 0, "escalation.examples must be an integer >= 1; got 0"),
        ("split", "", "escalation.split must be a non-empty string or null"),
        ("margin", 0.1, "escalation: unknown key 'margin'. Allowed keys: confidence, threshold, tolerance"),
    ],
)
def test_bad_escalation_is_named(data: dict[str, Any], key: str, value: Any, expected: str) -> None:
    data["escalation"] = {**ESCALATION, key: value}
    assert _one_problem(data).startswith(expected)


def test_escalation_without_threshold_or_not_an_object(data: dict[str, Any]) -> None:
    data["escalation"] = {"confidence": "token-probability"}
    assert _one_problem(data).startswith("escalation: missing key 'threshold'")
    data["escalation"] = 0.5
    assert _one_problem(data).startswith("escalation must be a JSON object; got 0.5 (float)")


def test_escalation_in_code_is_validated(data: dict[str, Any]) -> None:
    with pytest.raises(ManifestError, match=r"escalation\.threshold must be a finite number"):
        Escalation("token-probability", 2.0)
    values = {**Manifest.from_dict(data).__dict__, "escalation": dict(ESCALATION)}
    with pytest.raises(ManifestError, match=r"escalation must be an Escalation or None; got \{"):
        Manifest(**values)


# --- tokenizer digests (3) and paths the runtime may read ------------------------------------------


def test_tokenizer_sha256_is_required_from_schema_3(data: dict[str, Any]) -> None:
    del data["tokenizer_sha256"]
    assert _one_problem(data).startswith("missing key 'tokenizer_sha256' (required from schema_version 3)")


def test_every_tokenizer_file_has_exactly_one_digest(data: dict[str, Any]) -> None:
    data["tokenizer_files"] = ["tokenizer.json", "chat_template.jinja"]
    data["tokenizer_sha256"] = {"tokenizer.json": "not-a-digest", "vocab.txt": SHA_A}
    problems = _problems(data)
    assert problems[0].startswith("tokenizer_sha256['tokenizer.json'] must be a sha256 digest")
    assert problems[1] == "tokenizer_sha256['vocab.txt']: 'vocab.txt' is not one of tokenizer_files. Re-export."
    assert problems[2] == "tokenizer_sha256 has no digest for tokenizer file 'chat_template.jinja'. Re-export."


def test_swapped_vocabulary_is_refused(tmp_path: Path, data: dict[str, Any]) -> None:
    export = _export_dir(tmp_path, data)
    (export / "tokenizer.json").write_text('{"model": {"vocab": {"evil": 0}}}')
    with pytest.raises(ManifestError) as info:
        verify_files(export)
    assert info.value.problems[0].startswith("tokenizer_files: 'tokenizer.json' has sha256 ")
    assert f"but the manifest records {SHA_EMPTY_OBJECT}" in info.value.problems[0]


def test_template_symlinked_outside_the_export_is_refused(tmp_path: Path, data: dict[str, Any]) -> None:
    outside = tmp_path / "hostname"
    outside.write_text("{}")  # even with the recorded digest: the runtime never follows a link
    data["tokenizer_files"] = ["tokenizer.json", "chat_template.jinja"]
    data["tokenizer_sha256"] = {name: SHA_EMPTY_OBJECT for name in data["tokenizer_files"]}
    export = _export_dir(tmp_path / "export", data)
    (export / "chat_template.jinja").unlink()
    (export / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(ManifestError) as info:
        verify_files(export)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("tokenizer_files: file 'chat_template.jinja' is a symbolic link (")
    assert "never links" in info.value.problems[0]


def test_a_linked_folder_on_the_path_is_refused_but_a_linked_root_is_not(tmp_path: Path, data: dict[str, Any]) -> None:
    data["tokenizer_files"] = ["tokenizer/tokenizer.json"]
    data["tokenizer_sha256"] = {"tokenizer/tokenizer.json": SHA_EMPTY_OBJECT}
    (tmp_path / "export" / "tokenizer").mkdir(parents=True)
    export = _export_dir(tmp_path / "export", data)
    (tmp_path / "current").symlink_to(export)  # the export directory itself may be a link
    assert verify_files(tmp_path / "current").tokenizer_files == ("tokenizer/tokenizer.json",)
    (export / "tokenizer").rename(tmp_path / "elsewhere")
    (export / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match=r"file 'tokenizer/tokenizer.json' is a symbolic link \("):
        verify_files(export)


def test_paths_leaving_the_export_are_refused(tmp_path: Path, data: dict[str, Any]) -> None:
    data["tokenizer_files"] = ["../tokenizer.json"]
    data["tokenizer_sha256"] = {"../tokenizer.json": SHA_EMPTY_OBJECT}
    assert all("inside the export directory" in problem for problem in _problems(data))
    for relative in ("../tokenizer.json", "/etc/hostname", "a/../../b"):
        with pytest.raises(ManifestError, match="is not a relative path inside the export directory"):
            export_file(tmp_path, relative)


def test_schema_2_export_opens_with_a_warning_that_its_tokenizer_is_unchecked(
    tmp_path: Path, data: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    data["schema_version"] = 2
    del data["tokenizer_sha256"]
    export = _export_dir(tmp_path, data)
    assert "tokenizer_sha256" not in json.loads((export / MANIFEST_NAME).read_text())
    with caplog.at_level("WARNING", logger="shadowpeft.runtime.manifest_files"):
        manifest = verify_files(export)
    assert manifest.tokenizer_sha256 is None
    assert "records no sha256 for its tokenizer files" in caplog.text and "Re-export" in caplog.text
    (export / "tokenizer.json").unlink()  # presence is still checked
    with pytest.raises(ManifestError, match="tokenizer_files: 'tokenizer.json' is missing"):
        verify_files(export)


def test_deeply_nested_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ManifestError, match="nests its JSON too deeply to read"):
        Manifest.from_file(tmp_path)


def test_shadow_run_reports_a_deeply_nested_manifest_without_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from shadowpeft.runtime.run_cli import main

    (tmp_path / MANIFEST_NAME).write_text("{" + '"a":{' * 50_000 + "}" * 50_001)
    result = CliRunner().invoke(main, [str(tmp_path), "-p", "hi"])
    assert result.exit_code == 1 and "nests its JSON too deeply to read" in result.output, result.output
    assert "Traceback" not in result.output


# --- files for other runtimes (4) ------------------------------------------------------------------


def test_interop_files_are_optional_and_checked_like_graphs(tmp_path: Path, data: dict[str, Any]) -> None:
    assert Manifest.from_dict(data).interop_files is None  # absent: none written (e.g. a coupled-only export)
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "genai_config.json").write_text("{}")
    data["interop_files"] = {"device/genai_config.json": SHA_EMPTY_OBJECT}
    export = _export_dir(tmp_path, data)
    assert verify_files(export).interop_files == {"device/genai_config.json": SHA_EMPTY_OBJECT}
    (export / "device" / "genai_config.json").unlink()
    with pytest.raises(ManifestError, match=r"interop_files: file 'device/genai_config.json' is missing"):
        verify_files(export)


def test_interop_files_need_relative_paths_and_digests(data: dict[str, Any]) -> None:
    data["interop_files"] = {"../genai_config.json": SHA_A, "device/tokenizer.json": "x"}
    problems = _problems(data)
    assert problems[0].startswith("interop_files key '../genai_config.json' must be a relative path inside")
    assert problems[1].startswith("interop_files['device/tokenizer.json'] must be a sha256 digest")
