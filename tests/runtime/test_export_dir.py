"""Opening an export: hashes verified, tampered or incomplete exports refused with a clear error."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from shadowpeft.runtime.errors import ManifestError
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.run_cli import main


@pytest.fixture
def copied(toy_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(toy_export.export, target)
    return target


def test_a_changed_byte_in_a_graph_is_refused(copied):
    graph = copied / "device" / "shadow.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="device/shadow.onnx.*sha256"):
        open_export(copied)
    result = CliRunner().invoke(main, [str(copied), "-p", "red", "--no-chat"])
    assert result.exit_code == 1 and "sha256" in result.output and "Traceback" not in result.output


def test_a_missing_file_and_a_missing_manifest_are_refused(copied, tmp_path):
    (copied / "device" / "head.onnx").unlink()
    with pytest.raises(ManifestError, match="head.onnx' is missing"):
        open_export(copied)
    with pytest.raises(ManifestError, match="not a shadowpeft export"):
        open_export(tmp_path)


def test_providers_fall_back_to_cpu_and_threads_come_from_the_profile(toy_export):
    from shadowpeft.runtime.devices import load_device_profile

    export = open_export(toy_export.export, profile=load_device_profile("arm64-phone"))
    assert export.providers[-1] == "CPUExecutionProvider"
    assert export.threads == 4
    assert open_export(toy_export.export, threads=1).threads == 1
    assert export.session("device/shadow").get_providers()[-1] == "CPUExecutionProvider"


def test_coupled_mode_without_a_server_is_a_usage_error(toy_export):
    result = CliRunner().invoke(main, [str(toy_export.export), "-p", "red", "--mode", "coupled"])
    assert result.exit_code == 2 and "--server" in result.output


def test_spin_waiting_is_on_by_default_and_off_on_request(toy_export):
    from shadowpeft.runtime.export_dir import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2, spin_wait=False).get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime's default, spin
        session_options(2).get_session_config_entry(key)
    export = open_export(toy_export.export, threads=1, spin_wait=False)
    assert export.spin_wait is False and open_export(toy_export.export).spin_wait is True
    assert export.session("device/shadow").get_session_options().get_session_config_entry(key) == "0"


@pytest.mark.parametrize("mode", ["detached", "coupled", "auto"])
def test_only_detached_runs_spin_and_the_server_never_does(toy_export, monkeypatch, mode):
    """Threads that spin while the process waits on the network steal the cores a colocated
    server (or the device's own next run) needs; see runtime.export_dir.session_options."""
    import shadowpeft.runtime.export_dir as export_dir
    import shadowpeft.runtime.server as server
    from shadowpeft.runtime.serve_cli import main as serve_main

    opened = []

    def recording_open(*args, **kwargs):
        opened.append(kwargs.get("spin_wait", True))
        raise SystemExit(0)  # stop before any generation or serving

    monkeypatch.setattr(export_dir, "open_export", recording_open)
    CliRunner().invoke(
        main, [str(toy_export.export), "-p", "red", "--no-chat", "--mode", mode, "--server", "http://x"]
    )
    monkeypatch.setattr(server, "run_server", lambda *a, **k: None)
    CliRunner().invoke(serve_main, [str(toy_export.export), "--no-auth"])
    assert opened == [mode == "detached", False]
