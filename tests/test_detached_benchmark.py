"""Smoke test of benchmarks/detached.py on the toy Llama: rows, JSON layout, report, resume."""

from __future__ import annotations

import json

import pytest

from shadowpeft.recipes import Levers
from tests.conftest import load_benchmark
from tests.toy import save_toy_base, write_toy_data


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("detached")


def test_rows_put_edge_budget_baselines_in_only_when_the_budget_differs(bench):
    same = [r.name for r in bench.rows(Levers(aux_loss_weight=1.0, shadow_init="base:0"))]
    bigger = [r.name for r in bench.rows(Levers(aux_loss_weight=1.0, shadow_init="base:0-3"))]
    assert "lora@edge" not in same and {"lora@edge", "dora@edge"} <= set(bigger)
    assert same[0] == "edge" and {"paper", "lora", "dora", "detached-alone"} <= set(same)
    assert [r for r in bigger if r.startswith("paper+")] == [
        "paper+lambda",
        "paper+lambda+distill",
        "paper+init",
        "paper+refine",
    ]


def test_a_small_run_writes_every_output_and_resumes(bench, tmp_path, monkeypatch):
    base = save_toy_base(tmp_path / "base")
    files = write_toy_data(tmp_path, rows=80)
    tasks = (
        bench.TaskSpec("toy-cls", str(files["classification"]), 32, 4, 8),
        bench.TaskSpec("toy-gen", str(files["generation"]), 32, 4, 8),
    )
    edge = Levers(aux_loss_weight=1.0, distill_weight=1.0, shadow_init="base:0-1")
    chosen = ("edge", "lora", "detached-alone", "paper+refine")
    settings = bench.BenchSettings(str(base), tasks, chosen, 1, 8, bench.LR, edge.to_dict())
    out = tmp_path / "results"
    data = bench.run_benchmark(settings, out, resume=False, command="smoke")
    rows = data["rows"]
    assert len(rows) == 8
    keys = {"task", "method", "seed", "attached", "detached", "params", "local_fraction", "combined"}
    assert all(keys <= set(row) for row in rows)
    by = {(r["task"], r["method"]): r for r in rows}
    assert by[("toy-cls", "detached-alone")]["attached"] is None
    assert by[("toy-cls", "lora")]["detached"] is None and by[("toy-cls", "lora")]["attached"] is not None
    edge_row = by[("toy-gen", "edge")]
    assert edge_row["local_fraction"] is not None and 0 <= edge_row["local_fraction"] <= 1
    assert by[("toy-cls", "edge")]["params"] > by[("toy-cls", "paper+refine")]["params"]  # two copied layers
    assert json.loads((out / "detached.json").read_text())["rows"] == rows
    md = (out / "detached.md").read_text()
    assert "Status: **complete**" in md and "| edge |" in md and "## Targets (edge)" in md
    assert (out / "detached.png").stat().st_size > 0
    # Resume runs nothing that is recorded.
    monkeypatch.setattr(bench, "run_one", lambda *a, **k: pytest.fail("a recorded run ran again"))
    assert bench.run_benchmark(settings, out, resume=True, command="smoke")["rows"] == rows
