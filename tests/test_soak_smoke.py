"""Smoke test of benchmarks/soak.py: a 12-second soak of the real shadow-serve on the toy export.

Checks the report's structure and the targets that hold by construction of a correct server (no
wrong tokens, no unexpected 5xx, no tracebacks, no leaked sessions, every refusal a JSON error);
no timing is judged.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import soak

SETTINGS = {
    "kv_budget": "1MiB",
    "memory_budget": "256MiB",
    "idle_ttl_s": 1.0,
    "max_sessions": 16,
    "read_timeout_s": 1.0,
    "good_threads": 2,
    "bad_threads": 2,
    "prompts": 3,
    "new_tokens": 6,
    "seed": 0,
    "note": "test",
    "export": "toy",
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return soak.build_toy_export(tmp_path_factory.mktemp("soak-toy"))


@pytest.fixture(scope="module")
def recorded(toy, tmp_path_factory):
    export = toy
    out = tmp_path_factory.mktemp("soak-out")
    record = soak.run_soak(export, minutes=0.2, out=out, settings=dict(SETTINGS), command="test")
    return record, out


def test_soak_writes_its_report(recorded):
    record, out = recorded
    assert json.loads((out / "soak.json").read_text())["verdicts"] == record["verdicts"]
    text = (out / "soak.md").read_text()
    for heading in ("## Good sessions", "## Bad requests", "## Server", "## Targets"):
        assert heading in text
    results = record["results"]
    assert set(results) >= {"good", "bad", "status_5xx", "hangs", "tracebacks", "leaked_sessions", "memory"}
    assert set(results["memory"]) >= {"baseline_rss_bytes", "peak_rss_bytes", "kv_budget_bytes"}
    assert results["memory"]["peak_rss_bytes"] >= results["memory"]["baseline_rss_bytes"] > 0
    assert results["memory"]["kv_budget_bytes"] == 1 << 20
    assert results["memory"]["memory_budget_bytes"] == 256 << 20
    plan = results["memory"]["server_plan"]
    assert plan["baseline_bytes"] > 0 and plan["reserve_per_request_bytes"] > 0
    assert "--memory-budget" in recorded[0]["settings"]["server_options"]


def test_soak_meets_the_correctness_targets(recorded):
    results = recorded[0]["results"]
    assert results["good"]["generations"] > 0 and results["bad"]["requests"] > 0
    assert results["good"]["wrong_tokens"] == 0, results["examples"]
    assert results["status_5xx"]["unexpected"] == 0, results["examples"]
    assert results["tracebacks"] == 0
    assert results["non_json_refusals"] == 0, results["examples"]
    assert results["leaked_sessions"] == 0
    assert results["server_alive_at_end"]
    # every bad kind that answers over HTTP was refused with a 4xx (or the admission limits' 503)
    for kind in ("malformed_json", "wrong_token", "over_token_cap", "unknown_sequence"):
        statuses = results["bad"]["status_by_kind"].get(kind, {})
        assert all(s.startswith("4") or s == "503" for s in statuses), (kind, statuses)


def test_a_burst_of_slow_requests_meets_the_busy_refusal(toy):
    """The burst kind sends more slow requests at once than --max-concurrent + --max-queued admit: the rest
    get 503 + Retry-After (a JSON message), the admitted ones their ordinary answer."""
    from benchmarks.soak_bad import Bad
    from benchmarks.soak_tally import BURST, MAX_CONCURRENT, MAX_QUEUED, Tally
    from shadowpeft.runtime.admission import RequestLimits
    from shadowpeft.runtime.export_dir import open_export
    from shadowpeft.runtime.server import ServerConfig, create_app
    from tests.runtime.conftest import serve_in_thread

    export = open_export(toy)
    config = ServerConfig("t" * 32, requests=RequestLimits(max_concurrent=MAX_CONCURRENT, max_queued=MAX_QUEUED))
    tally = Tally()
    with serve_in_thread(create_app(export, config)) as url:
        hidden = next(s.shape[2] for s in export.graph("cloud/backbone").inputs if s.name == "shadow_states")
        bad = Bad(url, "t" * 32, hidden, 3.0, tally, seed=0)
        bad.kind_burst()
        bad.close()
    statuses = tally.bad_status["burst"]
    assert sum(statuses.values()) == BURST and statuses["503"] >= BURST - MAX_CONCURRENT - MAX_QUEUED, statuses
    assert tally.counts["5xx_503_retry_after"] == statuses["503"] and tally.counts["non_json_refusals"] == 0
