"""Smoke test of benchmarks/split_profile.py on the toy export, so it cannot rot (no timing is judged)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from benchmarks import split_profile
from benchmarks.split_stages import PROCESS_STAGES, STAGES


def test_smoke_profile_writes_every_stage_and_the_graphs_alone(toy_export, tmp_path) -> None:
    args = ["--smoke", "--export", str(toy_export.export), "--out", str(tmp_path)]
    args += ["--new-tokens", "3", "--repeats", "1", "--prompt-tokens", "5", "--no-int8-backbone"]
    coupled = toy_export.export / "coupled.onnx"
    args += ["--coupled-graph", str(coupled)]
    result = CliRunner().invoke(split_profile.cli, args, obj="python -m benchmarks.split_profile --smoke")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "split_profile_smoke.json").read_text())
    assert [row["stage"] for row in record["stages"]] == [stage for stage, _, _ in STAGES]
    assert record["other_coupled"][str(coupled)]["tokens_equal"] is True
    # The disjoint stages add up to the wall time of a step, by construction.
    assert abs(sum(row["ms"] for row in record["stages"]) - record["wall_ms"]) < 1e-6
    assert record["wire"]["requests_per_token"] == 1.0  # one request per decoded token
    assert len(record["tokens"]) == 3 and record["coupled_tokens_equal"] is True  # fp32 split == fp32 coupled
    expected = {"device/shadow no spin", "device/head no spin", "cloud/backbone spinning"}
    assert expected | {"cloud/backbone no spin, no CPU arena (as shadow-serve)"} <= set(record["alone_ms"])
    assert record["command"].startswith("python -m benchmarks.split_profile") and "shared_machine" in record
    markdown = (tmp_path / "split_profile_smoke.md").read_text()
    assert "| backbone_graph |" in markdown and "Shared machine:" in markdown


def test_int8_backbone_copy_is_timed_alone(toy_export) -> None:
    from shadowpeft.runtime.export_dir import open_export

    export = open_export(toy_export.export, threads=1, spin_wait=False)
    alone = split_profile.int8_backbone_alone(export, 1, past=4)
    assert set(alone) == {"cloud/backbone int8 no spin", "cloud/backbone int8 spinning"}
    assert all(seconds > 0 for seconds in alone.values())


def test_smoke_profile_against_a_shadow_serve_process_over_grpc(toy_export, tmp_path) -> None:
    args = ["--smoke", "--export", str(toy_export.export), "--out", str(tmp_path), "--server", "process"]
    args += ["--wire", "grpc"]
    args += ["--new-tokens", "3", "--repeats", "1", "--prompt-tokens", "5", "--no-int8-backbone"]
    result = CliRunner().invoke(split_profile.cli, args, obj="python -m benchmarks.split_profile --smoke")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "split_profile_smoke.json").read_text())
    assert [row["stage"] for row in record["stages"]] == [stage for stage, _, _ in PROCESS_STAGES]
    assert record["server"] == "process" and record["wire_kind"] == "grpc" and record["compute_ms"] is None
    assert abs(sum(row["ms"] for row in record["stages"]) - record["wall_ms"]) < 1e-6
    assert record["coupled_tokens_equal"] is True  # shadow-serve in its own process answers the same tokens


def test_in_thread_grpc_times_the_servicer_as_the_server_share(toy_export, tmp_path) -> None:
    args = ["--smoke", "--export", str(toy_export.export), "--out", str(tmp_path), "--wire", "grpc"]
    args += ["--new-tokens", "3", "--repeats", "1", "--prompt-tokens", "5", "--no-int8-backbone"]
    result = CliRunner().invoke(split_profile.cli, args, obj="python -m benchmarks.split_profile --smoke")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "split_profile_smoke.json").read_text())
    stages = {row["stage"]: row["ms"] for row in record["stages"]}
    assert stages["backbone_graph"] > 0 and stages["server_read_body"] == 0  # no HTTP body on the gRPC wire
    assert record["coupled_tokens_equal"] is True


def test_the_table_is_the_repeat_of_median_wall_time() -> None:
    repeats = [{"wall_s": wall, "stages_s": {"x": wall}} for wall in (3.0, 1.0, 2.0, 9.0)]
    assert split_profile.median_repeat(repeats)["wall_s"] == 2.0  # the lower middle of an even count
    assert split_profile.median_repeat(repeats[:3])["wall_s"] == 2.0
