"""Smoke test of benchmarks/accuracy.py: every method x task x seed on the toy Llama, then ``--resume``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType

import pytest

from benchmarks import accuracy

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, Path, dict]:
    out = tmp_path_factory.mktemp("accuracy")
    module = accuracy
    assert module.main(["--smoke", "--out", str(out)]) == 0
    return module, out, _read(out)


def _read(out: Path) -> dict:
    return json.loads((out / "accuracy_smoke.json").read_text(encoding="utf-8"))


def _expected_rows(module: ModuleType, record: dict) -> set[tuple[str, str, int]]:
    expected = set()
    for task in record["settings"]["tasks"]:
        for method in module.METHODS:
            if method == "zero-shot" and task["kind"] != "generation":
                continue
            expected |= {(task["name"], row, seed) for row, _ in module.ROWS[method] for seed in SEEDS}
    return expected


def test_every_method_task_and_seed_has_a_row(smoke: tuple[ModuleType, Path, dict]) -> None:
    module, out, record = smoke
    assert [t["name"] for t in record["settings"]["tasks"]] == ["toy-classification", "toy-generation"]
    rows = {(r["task"], r["row"], r["seed"]) for r in record["runs"]}
    assert rows == _expected_rows(module, record)
    assert len(rows) == len(record["runs"]) == 26  # 2 seeds x (6 classification rows + 7 generation rows)
    for run in record["runs"]:
        correct = run["accuracy"] * run["examples"]  # a share of the evaluated examples: a whole number of them
        assert run["examples"] > 0 and correct == pytest.approx(round(correct)) and 0 <= round(correct), run
        if run["method"] == "zero-shot":
            assert run["trainable_params"] == 0 and run["steps"] == 0 and run["lr"] is None, run
            continue
        assert run["trainable_params"] > 0 and run["adapter_params"] > 0 and run["seconds_per_step"] > 0, run
        assert run["steps"] == 10 and run["lr"] > 0, run
        assert (run["rank"] is not None) == (run["method"] in ("lora", "dora")), run
    assert sorted(p["seed"] for p in record["pretrain"]) == list(SEEDS)
    assert record["complete"] is True and record["machine"]["torch_threads"] >= 1
    assert record["commands"] == [f"python -m benchmarks.accuracy --smoke --out {out}"]
    assert not (out / ".accuracy_smoke_work").exists()  # pretrained shadows are dropped once complete


def test_baselines_match_the_shadow_budget(smoke: tuple[ModuleType, Path, dict]) -> None:
    _, _, record = smoke
    target = record["ranks"]["shadow_adapter_params"]
    by_method = {r["method"]: r["adapter_params"] for r in record["runs"] if r["task"] == "toy-generation"}
    assert by_method["shadow"] == by_method["shadow-pretrained"] == target
    for method in ("lora", "dora"):
        assert by_method[method] == record["ranks"][method]["params"]
        assert abs(by_method[method] - target) / target < 0.1


def test_markdown_and_chart_are_written(smoke: tuple[ModuleType, Path, dict]) -> None:
    _, out, _ = smoke
    md = (out / "accuracy_smoke.md").read_text(encoding="utf-8")
    assert md.startswith("# Accuracy at matched budgets")
    for label in ("LoRA", "DoRA", "ShadowPEFT, attached", "ShadowPEFT, pretrained shadow, detached", "zero-shot"):
        assert label in md
    assert "python -m benchmarks.accuracy --smoke" in md and "## Tuning" in md
    assert (out / "accuracy_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reruns_nothing_when_complete(smoke: tuple[ModuleType, Path, dict], monkeypatch) -> None:
    module, out, before = smoke

    def refuse(*args, **kwargs):
        raise AssertionError("--resume re-ran a recorded run")

    monkeypatch.setattr(module, "run_method", refuse)
    monkeypatch.setattr(module, "run_pretrain", refuse)
    start = time.perf_counter()
    assert module.main(["--smoke", "--out", str(out), "--resume"]) == 0
    assert time.perf_counter() - start < 15
    after = _read(out)
    assert after["runs"] == before["runs"] and after["complete"] is True
    assert len(after["commands"]) == 2 and after["commands"][-1].endswith("--resume")


def _spy(func, calls: list[tuple[str, str, int]]):
    """``func`` that first notes which unit (task, method, seed) it was called for."""

    def wrapper(unit, *args):
        calls.append((unit.task, unit.method, unit.seed))
        return func(unit, *args)

    return wrapper


def test_resume_runs_only_what_is_missing(smoke: tuple[ModuleType, Path, dict], tmp_path: Path, monkeypatch) -> None:
    module, out, record = smoke
    missing = ("toy-generation", "shadow-pretrained", 1)
    kept = [r for r in record["runs"] if (r["task"], r["method"], r["seed"]) != missing]
    (tmp_path / "accuracy_smoke.json").write_text(json.dumps({**record, "runs": kept, "complete": False}))
    calls: list[tuple[str, str, int]] = []
    for name in ("run_method", "run_pretrain"):
        monkeypatch.setattr(module, name, _spy(getattr(module, name), calls))
    assert module.main(["--smoke", "--out", str(tmp_path), "--resume"]) == 0
    # The pretrained shadow of seed 1 was dropped with the finished run, so it is pretrained again first.
    assert calls == [("toy-lm", "pretrain", 1), missing]
    assert _expected_rows(module, record) == {(r["task"], r["row"], r["seed"]) for r in _read(tmp_path)["runs"]}


def test_resume_refuses_other_settings(smoke: tuple[ModuleType, Path, dict], capsys) -> None:
    module, out, _ = smoke
    assert module.main(["--smoke", "--out", str(out), "--resume", "--steps", "3"]) == 2
    assert "differing: tasks" in capsys.readouterr().err
