"""``.ort`` copies: an export for an ``ort_format = true`` profile runs from them, verified like every file."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from shadowpeft.runtime.errors import ExportLoadError, ManifestError
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import Generator
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.manifest_files import file_sha256
from shadowpeft.runtime.run_cli import main
from shadowpeft.runtime.sampling import SamplingConfig

PROMPTS = [[5, 9, 31, 7, 12, 40, 11], [17, 23, 6]]
GREEDY = SamplingConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def ort_export(toy_export, tmp_path_factory):
    """The toy checkpoint exported (detached, fp32: the quickest export) for a profile that asks for .ort."""
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from shadowpeft.runtime.devices import DeviceProfile

    profile = DeviceProfile(
        name="toy-phone",
        description="toy profile with ort_format",
        providers=("CPUExecutionProvider",),
        intra_op_threads=1,
        weights="fp32",
        ort_format=True,
    )
    out = tmp_path_factory.mktemp("ort-export") / "export"
    export_checkpoint(toy_export.checkpoint, out, ExportOptions(selections=("detached",), profile=profile))
    return out


@pytest.fixture
def copied(ort_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(ort_export, target)
    return target


def _tokens(export) -> list[list[int]]:
    return [result.token_ids for result in Generator(export).generate(PROMPTS, GREEDY)]


def _cli_tokens(export_dir, *args: str) -> list[int]:
    result = CliRunner().invoke(main, [str(export_dir), "-p", "red blue", "--no-chat", "--json", *args])
    assert result.exit_code == 0, result.output
    return [json.loads(line)["token_id"] for line in result.output.splitlines() if '"token_id"' in line]


def test_the_manifest_records_the_copies_and_the_runtime_loads_them(ort_export):
    manifest = Manifest.from_file(ort_export)
    assert manifest.device_profile == "toy-phone"
    assert {key: graph.file for key, graph in manifest.graphs.items()} == {
        "device/shadow": "device/shadow.onnx",
        "ort/device/shadow": "device/shadow.ort",
    }
    export = open_export(ort_export, threads=1)
    assert export.file_of("device/shadow") == "device/shadow.ort"
    ort_tokens = _tokens(export)
    assert export.session("device/shadow").get_session_options().get_session_config_entry(
        "session.load_model_format"
    ) == ("ORT")
    onnx = open_export(ort_export, threads=1, graph_format="onnx")
    assert onnx.file_of("device/shadow") == "device/shadow.onnx"
    assert ort_tokens == _tokens(onnx)


def test_without_its_onnx_files_the_export_still_runs_from_the_copies(ort_export, copied):
    expected = _cli_tokens(ort_export, "--graph-format", "onnx")
    (copied / "device" / "shadow.onnx").unlink()
    assert _cli_tokens(copied) == expected
    assert _tokens(open_export(copied, threads=1)) == _tokens(open_export(ort_export, threads=1, graph_format="onnx"))
    # Asked to run the .onnx graphs, the verifier reports them missing.
    result = CliRunner().invoke(main, [str(copied), "-p", "red", "--no-chat", "--graph-format", "onnx"])
    assert result.exit_code == 1 and "device/shadow.onnx' is missing" in result.output


def test_a_tampered_ort_copy_is_refused(copied):
    graph = copied / "device" / "shadow.ort"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"graphs\['ort/device/shadow'\]: file 'device/shadow.ort' has sha256"):
        open_export(copied)
    result = CliRunner().invoke(main, [str(copied), "-p", "red", "--no-chat"])
    assert result.exit_code == 1 and "shadow.ort' has sha256" in result.output and "Traceback" not in result.output
    with pytest.raises(ManifestError, match="shadow.ort"):  # verified even when the run would not read it
        open_export(copied, graph_format="onnx")


def _unloadable_copy(export_dir) -> None:
    """Replace device/shadow.ort with bytes onnxruntime cannot read, recorded with their sha256 (as if
    the copy came from an onnxruntime whose .ort format this one does not read)."""
    path = export_dir / "device" / "shadow.ort"
    path.write_bytes(b"not an ORT flatbuffer" * 8)
    manifest = Manifest.from_file(export_dir)
    graphs = dict(manifest.graphs)
    graphs["ort/device/shadow"] = dataclasses.replace(graphs["ort/device/shadow"], sha256=file_sha256(path))
    dataclasses.replace(manifest, graphs=graphs).write(export_dir)


def test_a_copy_onnxruntime_cannot_load_falls_back_in_auto_and_is_refused_in_ort(ort_export, copied, caplog):
    _unloadable_copy(copied)
    export = open_export(copied, threads=1)
    with caplog.at_level(logging.WARNING, logger="shadowpeft.runtime.export_dir"):
        tokens = _tokens(export)
    assert "could not load device/shadow.ort, the .ort copy of device/shadow" in caplog.text
    assert "running device/shadow.onnx instead" in caplog.text
    assert export.file_of("device/shadow") == "device/shadow.onnx"
    assert tokens == _tokens(open_export(ort_export, threads=1, graph_format="onnx"))

    with pytest.raises(ExportLoadError, match="--graph-format onnx"):
        open_export(copied, graph_format="ort").session("device/shadow")
    (copied / "device" / "shadow.onnx").unlink()  # nothing to fall back to
    with pytest.raises(ExportLoadError, match="it needs device/shadow.onnx"):
        open_export(copied).session("device/shadow")


def test_ort_format_on_an_export_without_copies_is_refused(toy_export):
    with pytest.raises(ExportLoadError, match="has no .ort copies.*ort_format = true"):
        open_export(toy_export.export, graph_format="ort")
    assert open_export(toy_export.export).file_of("device/shadow") == "device/shadow.onnx"
    result = CliRunner().invoke(main, [str(toy_export.export), "-p", "red", "--graph-format", "ort"])
    assert result.exit_code == 1 and "has no .ort copies" in result.output


def test_quantizing_an_export_converts_its_copies_again(ort_export, toy_export, tmp_path):
    """quantize_export (benchmarks derive int8/int4 from fp32 with it) used to pass the .ort files to the
    quantizer; the copies must follow the quantized graphs, or the runtime would run stale fp32 copies."""
    from shadowpeft.export.pipeline import quantize_export

    manifest = quantize_export(ort_export, tmp_path / "int8", weights="int8")
    shadow, copy = manifest.graphs["device/shadow"], manifest.graphs["ort/device/shadow"]
    assert (shadow.weights, copy.weights, copy.file) == ("int8", "int8", "device/shadow.ort")
    assert copy.sha256 != Manifest.from_file(ort_export).graphs["ort/device/shadow"].sha256
    export = open_export(tmp_path / "int8", threads=1)
    assert export.file_of("device/shadow") == "device/shadow.ort"
    assert _tokens(export) == _tokens(open_export(tmp_path / "int8", threads=1, graph_format="onnx"))
    plain = quantize_export(toy_export.export, tmp_path / "plain", weights="int8")  # no copies: none appear
    assert {key: graph.weights for key, graph in plain.graphs.items()} == {
        "device/shadow": "int8",
        "device/head": "int8",
        "cloud/backbone": "fp32",
        "coupled": "int8",
    }
