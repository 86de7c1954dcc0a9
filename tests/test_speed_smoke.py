"""Smoke tests of benchmarks/speed.py and benchmarks/training_cost.py on the toy Llama, so they cannot rot.

Nothing here judges a timing: the targets are reported by the benchmarks, not asserted. The one
duration checked is the injected delay, a lower bound the split row must show by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks import speed, speed_bandwidth, speed_report, training_cost

SPEED_ROWS = (
    "torch-published",
    "torch-peft-tuner",
    "torch-attached",
    "torch-detached",
    "torch-base",
    *(f"ort-{graph}-{w}" for w in ("fp32", "int8", "int4") for graph in ("plain", "coupled", "detached")),
    *(f"ort-coupled-std-{w}" for w in ("fp32", "int8", "int4")),
    *(f"genai-plain-{w}" for w in ("fp32", "int8", "int4")),
    "split-loopback",
    "split-delay",
)
# Fresh adapters are the identity and fp32 graphs match PyTorch, so these rows must give their reference's tokens.
# Quantized, only the standard coupled graph quantizes exactly as the plain base graph on the toy: its k and v
# projections (32 columns) are too narrow to quantize apart, while the fused graph's one q/k/v weight (128
# columns) is quantized, so the fused int8/int4 coupled rows may pick other tokens here (not on SmolLM2).
MUST_MATCH = (
    "torch-published",
    "torch-peft-tuner",
    "torch-attached",
    "ort-plain-fp32",
    "ort-coupled-fp32",
    "ort-detached-fp32",
    "ort-coupled-std-fp32",
    "ort-coupled-std-int8",
    "ort-coupled-std-int4",
    "genai-plain-fp32",
    "split-delay",
)


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("speed")
    rc = speed.main(["--smoke", "--out", str(out)])
    return rc, json.loads((out / "speed_smoke.json").read_text(encoding="utf-8")), out


@pytest.fixture(scope="module")
def training_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, int, dict, Path]:
    out = tmp_path_factory.mktemp("training-cost")
    module = training_cost
    rc = module.main(["--smoke", "--out", str(out)])
    return module, rc, json.loads((out / "training_cost_smoke.json").read_text(encoding="utf-8")), out


def test_speed_smoke_measures_every_row(speed_run: tuple[int, dict, Path]) -> None:
    rc, record, out = speed_run
    assert rc == 0 and record["failed"] == {}
    rows = {row["id"]: row for row in record["rows"]}
    assert tuple(rows) == SPEED_ROWS
    for row in rows.values():
        assert math.isfinite(row["decode_ms_per_token"]) and row["decode_ms_per_token"] > 0, row["id"]
        assert math.isfinite(row["prefill_tokens_per_s"]) and row["prefill_tokens_per_s"] > 0, row["id"]
        assert row["peak_rss_mb"] > 0 and len(row["decode_ms_per_token_runs"]) == 2, row["id"]
        assert len(row["tokens"]) == record["new_tokens"] == 8, row["id"]
    assert record["rows"][0]["ratio_vs_first"] == pytest.approx(1.0)
    assert record["smoke"] is True and record["prompt_tokens"] == 16 and record["repeats"] == 2
    assert record["machine"]["cpu_model"] and record["machine"]["onnxruntime"]
    assert record["bandwidth"]["read_gb_s"] > 0 and record["command"].startswith("python -m benchmarks.speed --smoke")
    assert (out / "speed_smoke.md").read_text(encoding="utf-8").startswith("# Speed")
    assert (out / "speed_smoke.png").stat().st_size > 0


def test_speed_smoke_rows_are_what_they_claim(speed_run: tuple[int, dict, Path]) -> None:
    _, record, _ = speed_run
    rows = {row["id"]: row for row in record["rows"]}
    for row_id in MUST_MATCH:
        assert rows[row_id]["tokens_match_reference"] is True, (row_id, rows[row_id]["reference"])
    for row_id, row in rows.items():
        assert row["torch_imported"] is (row["kind"] == "torch"), row_id  # the runtime rows stay torch-free
        if row["kind"] == "ort":
            assert row["file_bytes"] > 0 and row["weight_bytes_per_token"] > 0 and row["bandwidth_fraction"] > 0
        if row["kind"] == "genai":  # the anchor is the builder's fused graph, and its agreement is reported
            assert row["file_bytes"] > 0 and row["extra"]["fused_ops"]["GroupQueryAttention"] == 3
            assert 0.0 <= row["agreement"] <= 1.0 and row["agreement_with"] == row_id.replace("genai", "ort")
    assert rows["genai-plain-int4"]["extra"]["fused_ops"]["MatMulNBits"] > 0
    assert rows["split-delay"]["decode_ms_per_token"] >= record["delay_ms"] == 20.0  # one round trip per token
    assert rows["split-loopback"]["extra"]["bytes_sent_per_token"] > 0
    assert [t["id"] for t in record["targets"]] == [
        "attached-vs-published",
        "attached-vs-peft",
        "attached-vs-base",
        "coupled-int8-vs-base-int8",
        "detached-int8-vs-base-int8",
        "coupled-int4-vs-genai-int4",
        "coupled-int8-vs-genai-int8",
        "detached-int4-vs-genai-int4",
        "coupled-int4-prefill-vs-genai-int4",
        "coupled-int8-prefill-vs-genai-int8",
        "split-vs-coupled-local",
    ]
    assert all(t["value"] > 0 and t["met"] in (True, False) for t in record["targets"])
    assert record["plain_graph_max_abs_diff"] <= 1e-3


def test_weight_bytes_per_token_reads_one_embedding_row(tmp_path: Path) -> None:
    bandwidth = speed_bandwidth
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((4, 3), np.int8), "weight")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w32"], ["y"])]
    nodes.insert(1, helper.make_node("Cast", ["weight"], ["w32"], to=TensorProto.FLOAT))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [table, weight],
    )
    onnx.save(helper.make_model(graph), tmp_path / "g.onnx")
    assert bandwidth.weight_bytes_per_token(tmp_path / "g.onnx") == 4 * 4 + 4 * 3  # one fp32 row + the int8 matrix


def test_token_check_stops_at_end_of_sequence() -> None:
    report = speed_report
    assert report.same_tokens([5, 6, 7], [5, 6, 7], (3,))
    assert report.same_tokens([5, 6, 3, 1], [5, 6, 9, 9], (3,))  # PyTorch suppressed EOS; the graph emitted it
    assert not report.same_tokens([5, 6, 7], [5, 8, 7], (3,))


def test_training_cost_smoke(training_run: tuple[ModuleType, int, dict, Path]) -> None:
    module, rc, record, out = training_run
    assert rc == 0 and record["failed"] == {}
    rows = {row["row"]: row for row in record["rows"]}
    assert tuple(rows) == module.ROWS
    for name, row in rows.items():
        assert row["s_per_step"] > 0 and len(row["measured_s"]) == 3 and len(row["step_s"]) == 4, name
        assert row["trainable_params"] > 0 and row["peak_rss_mb"] >= row["rss_loaded_mb"] > 0, name
        assert row["flush_denormal"] is (name == "shadow-other-denormals"), name  # one policy: keep, by default
        assert row["batch_widths"] and max(row["batch_widths"]) <= record["settings"]["seq_len"], name
    assert rows["lora"]["rank"] == record["ranks"]["lora"]["rank"] and rows["dora"]["rank"] >= 1
    assert rows["shadow"]["trainable_params"] == record["ranks"]["shadow_adapter_params"]
    assert record["target"]["value"] > 0 and record["denormal"]["ratio"] > 0
    for name, row in rows.items():  # the shadow loss's head is timed in the ShadowPEFT rows only
        assert (row["aux_head_s"] is not None) is name.startswith("shadow"), name
    assert rows["shadow"]["aux_head_s"] > 0 and record["target"]["aux_head_s"] == rows["shadow"]["aux_head_s"]
    assert record["target"]["value_without_aux_head"] < record["target"]["value"]
    assert "The shadow loss's head alone" in (out / "training_cost_smoke.md").read_text(encoding="utf-8")
    assert record["machine"]["cpu_model"] and record["command"].startswith("python -m benchmarks.training_cost")
    assert (out / "training_cost_smoke.md").read_text(encoding="utf-8").startswith("# Training cost")
    assert (out / "training_cost_smoke.png").stat().st_size > 0


def test_the_speed_page_shows_the_split_profiles_beside_it(tmp_path: Path) -> None:
    stage = {"stage": "backbone_graph", "label": "cloud/backbone session run (server)", "compute": True, "ms": 9.5}
    profile = {
        "smoke": False, "graph_weights": {"cloud/backbone": "int8"}, "stages": [stage], "compute_ms": 9.5,
        "not_compute_ms": 3.25, "wall_ms": 12.75, "coupled_local_ms": 9.0, "split_vs_coupled_local": 1.42,
        "command": "python -m benchmarks.split_profile", "date": "2026-12-05T00:47:17", "shared_machine": False,
    }  # fmt: skip
    (tmp_path / "split_profile.json").write_text(json.dumps(profile), encoding="utf-8")
    (tmp_path / "split_profile_smoke.json").write_text(json.dumps({**profile, "smoke": True}), encoding="utf-8")
    found = speed_report.split_profiles(tmp_path)
    assert found == [profile]  # the smoke record is not shown
    lines = "\n".join(speed_report.split_profile_lines(found))
    assert "| stage | compute | backbone int8 |" in lines
    assert "| cloud/backbone session run (server) | yes | 9.50 |" in lines
    assert "| **not compute** | | **3.25** |" in lines and "| split / local coupled | | 1.42x |" in lines
    assert speed_report.split_profile_lines([]) == []
