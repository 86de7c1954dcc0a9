"""Smoke test of benchmarks/decode_speed.py: every row runs on a tiny random Llama in seconds."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from pathlib import Path

import pytest

from benchmarks import decode_speed

COMPETITOR_AND_BASE_ROWS = ("a-cached", "a-uncached", "b-cached", "d-base")
OUR_ROWS = ("c-attached", "c-detached")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    rc = decode_speed.main(["--smoke", "--out", str(out)])
    record = json.loads((out / "decode_speed_smoke.json").read_text(encoding="utf-8"))
    return rc, record, out


def _rows(record: dict) -> dict[str, dict]:
    return {row["id"]: row for row in record["rows"]}


def _assert_positive_finite(row: dict) -> None:
    assert math.isfinite(row["ms_per_token"]) and row["ms_per_token"] > 0, row
    assert math.isfinite(row["ratio_vs_base"]) and row["ratio_vs_base"] > 0, row
    assert len(row["ms_per_token_runs"]) == 2


def test_competitor_and_base_rows(smoke_run: tuple[int, dict, Path]) -> None:
    _, record, out = smoke_run
    rows = _rows(record)
    for row_id in COMPETITOR_AND_BASE_ROWS:
        assert row_id in rows, f"missing row {row_id}"
        _assert_positive_finite(rows[row_id])
    assert rows["d-base"]["ratio_vs_base"] == pytest.approx(1.0)
    # Fresh shadows start as the identity, so the attached competitors reproduce the base tokens.
    for row_id in ("a-cached", "a-uncached", "b-cached"):
        assert rows[row_id]["tokens_match_base"] is True, row_id
    assert record["smoke"] is True and record["new_tokens"] == 8 and record["repeats"] == 2
    assert record["machine"]["torch_threads"] >= 1 and record["machine"]["cpu_model"]
    assert (out / "decode_speed_smoke.md").read_text(encoding="utf-8").startswith("# Decode speed")


def test_our_rows(smoke_run: tuple[int, dict, Path]) -> None:
    rc, record, _ = smoke_run
    rows = _rows(record)
    if not all(row_id in rows for row_id in OUR_ROWS):
        try:
            importlib.import_module("shadowpeft.heads")
        except ImportError as exc:
            assert rc != 0
            pytest.skip(f"shadowpeft.heads does not import yet ({exc}); row (c) cannot be measured")
        pytest.fail(f"shadowpeft.heads imports but row (c) is unavailable: {record['unavailable']}")
    for row_id in OUR_ROWS:
        _assert_positive_finite(rows[row_id])
    assert rows["c-attached"]["tokens_match_base"] is True
    assert record["unavailable"] == {}
    assert rc == 0
