"""shadow-triton: the Triton model repository written for an export's cloud graph."""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from shadowpeft.export.errors import ExportError
from shadowpeft.export.triton import (
    CLOUD_GRAPH,
    model_config_schema,
    parse_model_config,
    write_triton_repository,
)
from shadowpeft.export.triton_cli import main
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import file_sha256
from tests.runtime.conftest import toy_export  # noqa: F401  (fixture re-export)
from tests.tolerances import CACHED_VS_FULL_FP32

MODEL = "shadow-backbone"


@pytest.fixture(scope="module")
def repo(toy_export, tmp_path_factory) -> Path:  # noqa: F811
    return write_triton_repository(toy_export.export, tmp_path_factory.mktemp("triton") / "repo", max_batch_size=4)


@pytest.fixture(scope="module")
def config(repo):
    text = (repo / MODEL / "config.pbtxt").read_text(encoding="utf-8")
    return text_format.Parse(text, model_config_schema().ModelConfig())


def _cloud(toy_export):  # noqa: F811
    return Manifest.from_file(toy_export.export).graph(CLOUD_GRAPH)


def test_schema_is_the_one_tritonclient_ships():
    schema = model_config_schema()
    assert Path(schema.__file__).as_posix().endswith("tritonclient/grpc/model_config_pb2.py")
    assert schema.ModelConfig.DESCRIPTOR.full_name == "inference.ModelConfig"


def test_layout(repo):
    files = sorted(path.relative_to(repo).as_posix() for path in repo.rglob("*") if path.is_file())
    assert files == ["README.md", f"{MODEL}/1/model.onnx", f"{MODEL}/config.pbtxt"]
    assert not [path for path in repo.parent.iterdir() if path.name.startswith(".")]  # no staging left


def test_config_header(config):
    assert config.name == MODEL
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert config.sequence_batching.WhichOneof("strategy_choice") == "oldest"
    assert config.sequence_batching.max_sequence_idle_microseconds == 60_000_000
    assert not config.sequence_batching.control_input  # the graph has no control inputs
    assert [group.count for group in config.instance_group] == [1]


def test_regular_inputs_and_outputs(config, toy_export):  # noqa: F811
    graph = _cloud(toy_export)
    hidden = graph.outputs[0].shape[-1]
    inputs = {io.name: (model_config_schema().DataType.Name(io.data_type), list(io.dims)) for io in config.input}
    assert inputs == {
        "input_ids": ("TYPE_INT64", [-1]),
        "shadow_states": ("TYPE_FP32", [-1, hidden]),
        "attention_mask": ("TYPE_INT64", [-1]),
        "position_ids": ("TYPE_INT64", [-1]),
    }
    assert [(io.name, list(io.dims)) for io in config.output] == [("hidden_states", [-1, hidden])]


def test_every_kv_pair_is_an_implicit_state(config, toy_export):  # noqa: F811
    graph = _cloud(toy_export)
    manifest = Manifest.from_file(toy_export.export)
    specs = {spec.name: spec for spec in (*graph.inputs, *graph.outputs)}
    states = config.sequence_batching.state
    assert len(states) == 2 * manifest.num_layers
    layers = range(manifest.num_layers)
    expected = [(f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in layers for k in ("key", "value")]
    assert [(state.input_name, state.output_name) for state in states] == expected
    for state in states:
        _, kv_heads, _, head_dim = specs[state.input_name].shape
        assert list(state.dims) == [kv_heads, -1, head_dim]
        assert model_config_schema().DataType.Name(state.data_type) == "TYPE_FP32"
        (initial,) = state.initial_state
        assert initial.zero_data and initial.name
        assert list(initial.dims) == [kv_heads, 0, head_dim]
        assert initial.data_type == state.data_type


def test_model_is_the_exported_cloud_graph(repo, toy_export):  # noqa: F811
    source = toy_export.export / _cloud(toy_export).file
    copied = repo / MODEL / "1" / "model.onnx"
    assert filecmp.cmp(source, copied, shallow=False)
    assert file_sha256(copied) == _cloud(toy_export).sha256


def _run_sequence(session, config, ids, s0) -> list[np.ndarray]:
    """Runs steps as Triton does: states start empty, each present.* becomes the next past_key_values.*."""
    declared = config.sequence_batching.state
    batch = ids[0].shape[0]
    states = {s.input_name: np.zeros([batch, *s.initial_state[0].dims], np.float32) for s in declared}
    carried = {s.output_name: s.input_name for s in declared}
    names = [output.name for output in session.get_outputs()]
    past, hidden = 0, []
    for step_ids, step_s0 in zip(ids, s0, strict=True):
        new = step_ids.shape[1]
        positions = np.tile(np.arange(past, past + new, dtype=np.int64), (batch, 1))
        mask = np.ones((batch, past + new), np.int64)  # what the device sends: P + T ones
        feed = {"input_ids": step_ids, "shadow_states": step_s0, "attention_mask": mask, "position_ids": positions}
        result = dict(zip(names, session.run(names, {**feed, **states}), strict=True))
        past += new
        states = {carried[name]: value for name, value in result.items() if name in carried}
        assert all(value.shape[2] == past for value in states.values())
        hidden.append(result["hidden_states"])
    return hidden


def test_model_runs_like_triton_runs_it(repo, config, toy_export):  # noqa: F811
    """Implicit state from the empty initial state; two sequences of equal lengths batched = run apart."""
    session = ort.InferenceSession(str(repo / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = _cloud(toy_export).outputs[0].shape[-1]
    rng = np.random.default_rng(0)
    lengths = (3, 1, 1)  # a chunked prompt, then two decode steps
    ids = [rng.integers(4, 100, (2, n), dtype=np.int64) for n in lengths]
    s0 = [rng.standard_normal((2, n, hidden)).astype(np.float32) for n in lengths]
    batched = _run_sequence(session, config, ids, s0)
    for row in (0, 1):
        alone = _run_sequence(session, config, [i[row : row + 1] for i in ids], [s[row : row + 1] for s in s0])
        for one, both in zip(alone, batched, strict=True):
            np.testing.assert_allclose(one[0], both[row], atol=CACHED_VS_FULL_FP32)
    assert not np.allclose(batched[-1][0], batched[-1][1])  # the rows are different sequences


def test_readme_explains_the_protocol(repo):
    text = (repo / "README.md").read_text(encoding="utf-8")
    for needle in ("tritonserver --model-repository", "sequence_id", "sequence_start", "sequence_end", "binary"):
        assert needle in text
    assert "shadow-serve" in text and "position" in text


def test_parse_error_is_an_export_error():
    with pytest.raises(ExportError, match="does not parse"):
        parse_model_config('name: "x"\nmax_batch_size: "many"\n')


def test_refuses_existing_output(toy_export, tmp_path):  # noqa: F811
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--overwrite"):
        write_triton_repository(toy_export.export, out)
    assert (out / "keep.txt").read_text() == "mine"
    write_triton_repository(toy_export.export, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / MODEL / "config.pbtxt").is_file()


def test_refuses_output_inside_the_export(toy_export):  # noqa: F811
    with pytest.raises(ExportError, match="overlap"):
        write_triton_repository(toy_export.export, toy_export.export / "triton")


def test_refuses_missing_export(tmp_path):
    with pytest.raises(ExportError, match="manifest.json"):
        write_triton_repository(tmp_path / "nope", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_refuses_export_without_cloud_graph(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    manifest = Manifest.from_file(export)
    graphs = {key: graph for key, graph in manifest.graphs.items() if key != CLOUD_GRAPH}
    dataclasses.replace(manifest, graphs=graphs).write(export)
    with pytest.raises(ExportError, match=r"no cloud graph 'cloud/backbone'.*--split"):
        write_triton_repository(export, tmp_path / "repo")


def test_refuses_tampered_graph(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    with (export / _cloud(toy_export).file).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExportError, match="sha256"):
        write_triton_repository(export, tmp_path / "repo")


def test_cloud_host_needs_only_the_cloud_files(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    shutil.rmtree(export / "device")
    shutil.rmtree(export / "tokenizer")
    assert (write_triton_repository(export, tmp_path / "repo") / MODEL / "config.pbtxt").is_file()


def _with_cloud_spec(export: Path, **changes) -> None:
    manifest = Manifest.from_file(export)
    graph = dataclasses.replace(manifest.graph(CLOUD_GRAPH), **changes)
    dataclasses.replace(manifest, graphs={**manifest.graphs, CLOUD_GRAPH: graph}).write(export)


def test_manifest_that_contradicts_the_graph_is_refused(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    graph = _cloud(toy_export)
    inputs = tuple(dataclasses.replace(s, dtype="float16") if s.name == "shadow_states" else s for s in graph.inputs)
    _with_cloud_spec(export, inputs=inputs)
    with pytest.raises(ExportError, match=r"disagrees.*\n.*'shadow_states' is TYPE_FP16 in the config but FLOAT"):
        write_triton_repository(export, tmp_path / "repo")


def test_kv_input_without_its_present_output_is_refused(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    graph = _cloud(toy_export)
    _with_cloud_spec(export, outputs=tuple(spec for spec in graph.outputs if spec.name != "present.1.value"))
    with pytest.raises(ExportError, match="'past_key_values.1.value' has no output 'present.1.value'"):
        write_triton_repository(export, tmp_path / "repo")


def test_external_data_keeps_the_names_the_graph_references(toy_export, tmp_path):  # noqa: F811
    export = shutil.copytree(toy_export.export, tmp_path / "export")
    manifest = Manifest.from_file(export)
    graph = manifest.graph(CLOUD_GRAPH)
    path = export / graph.file
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="backbone.weights", size_threshold=1024)
    data = {f"{Path(graph.file).parent.as_posix()}/backbone.weights": file_sha256(path.parent / "backbone.weights")}
    _with_cloud_spec(export, sha256=file_sha256(path), external_data={})
    with pytest.raises(ExportError, match="references 'backbone.weights'; the manifest does not list it"):
        write_triton_repository(export, tmp_path / "repo")
    _with_cloud_spec(export, external_data=data)

    repo = write_triton_repository(export, tmp_path / "repo")
    version = repo / MODEL / "1"
    assert sorted(p.name for p in version.iterdir()) == ["backbone.weights", "model.onnx"]
    assert filecmp.cmp(path, version / "model.onnx", shallow=False)
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "hidden_states" in [output.name for output in session.get_outputs()]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size=0"),
        ({"model_name": "a/b"}, "model name"),
        ({"instances": -1}, "instances=-1"),
        ({"max_sequence_idle_us": 0}, "max_sequence_idle_us=0"),
    ],
)
def test_rejects_bad_options(toy_export, tmp_path, options, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        write_triton_repository(toy_export.export, tmp_path / "repo", **options)


def test_cli_writes_a_repository(toy_export, tmp_path):  # noqa: F811
    out = tmp_path / "repo"
    args = [str(toy_export.export), "-o", str(out), "--max-batch-size", "2", "--instances", "3"]
    result = CliRunner().invoke(main, [*args, "--max-sequence-idle-us", "5000000", "--model-name", "cloud"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Wrote {out}.")
    config = parse_model_config((out / "cloud" / "config.pbtxt").read_text(encoding="utf-8"))
    assert (config.name, config.max_batch_size, config.instance_group[0].count) == ("cloud", 2, 3)
    assert config.sequence_batching.max_sequence_idle_microseconds == 5_000_000


def test_cli_errors(toy_export, tmp_path):  # noqa: F811
    runner = CliRunner()
    missing = runner.invoke(main, [str(tmp_path / "nope"), "-o", str(tmp_path / "repo")])
    assert missing.exit_code == 1
    assert missing.output.startswith("Error: Cannot use") and "manifest.json" in missing.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    taken = runner.invoke(main, [str(toy_export.export), "-o", str(tmp_path / "taken")])
    assert taken.exit_code == 1 and "--overwrite" in taken.output
    bad = runner.invoke(main, [str(toy_export.export), "-o", str(tmp_path / "r"), "--max-batch-size", "0"])
    assert bad.exit_code == 2 and "--max-batch-size" in bad.output
    name = runner.invoke(main, [str(toy_export.export), "-o", str(tmp_path / "r"), "--model-name", "a/b"])
    assert name.exit_code == 2 and "model name" in name.output
    no_out = runner.invoke(main, [str(toy_export.export)])
    assert no_out.exit_code == 2 and "-o" in no_out.output
