"""Smoke test of benchmarks/detached.py on the toy Llama: rows, JSON layout, report, resume."""

from __future__ import annotations

import json

import pytest

from benchmarks import detached, detached_levers
from shadowpeft.train.recipes import Levers
from tests.toy import save_toy_base, write_toy_data


@pytest.fixture(scope="module")
def bench():
    return detached


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


def _shard(bench, settings, tmp_path, name, records, **changes):
    import dataclasses

    shard = dataclasses.replace(settings, **changes)
    data = {
        "settings": bench.asdict(shard),
        "rows": records,
        "started": f"2026-01-0{len(name)}",
        "machine": bench.machine(),
    }
    (tmp_path / name).mkdir()
    (tmp_path / name / "detached.json").write_text(json.dumps(data))


def test_merge_joins_shards_in_run_order_and_refuses_other_settings(bench, tmp_path):
    tasks = (bench.TaskSpec("a", "a", 32, 4, 8), bench.TaskSpec("b", "b", 32, 4, 8))
    settings = bench.BenchSettings("base", tasks, ("edge", "lora", "paper+init"), 1, 8, bench.LR, Levers().to_dict())

    def row(task, method):
        return {
            "task": task,
            "method": method,
            "seed": 0,
            "attached": 0.5,
            "detached": None,
            "ratio": None,
            "params": 1,
            "local_fraction": None,
            "combined": None,
            "s_per_step": 1.0,
        }

    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(bench, settings, shards, "b", [row("b", "paper+init"), row("b", "edge")], tasks=tasks[1:])
    _shard(bench, settings, shards, "aa", [row("a", "lora"), row("a", "edge")], tasks=tasks[:1], rows=("edge", "lora"))
    data = bench.merge_shards(settings, shards, tmp_path / "out", command="merge")
    order = [(r["task"], r["method"]) for r in data["rows"]]
    assert order == [("a", "edge"), ("a", "lora"), ("b", "edge"), ("b", "paper+init")]
    assert data["commands"][-1] == "merge" and (tmp_path / "out" / "detached.md").is_file()
    _shard(bench, settings, shards, "c", [row("a", "edge")], batch_size=4)
    with pytest.raises(bench.click.ClickException, match="other settings"):
        bench.merge_shards(settings, shards, tmp_path / "out2", command="merge")


def test_lever_variants_each_move_one_lever_of_edge(tmp_path):
    levers = detached_levers
    edge = levers.EDGE.to_dict()
    for name, (variant, factor) in levers.VARIANTS.items():
        moved = {k for k, v in variant.to_dict().items() if v != edge[k]}
        assert len(moved) + (factor != 1) <= 2 and (name == "edge") == (not moved and factor == 1), name
    out = tmp_path / "levers.jsonl"
    out.write_text('{"variant": "edge", "task": "intent", "seed": 1}\n')
    assert levers.recorded(out) == {("edge", "intent", 1)}
