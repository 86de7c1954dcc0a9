"""The server's process-wide memory budget (runtime/memory.py, ``shadow-serve --memory-budget``) and the
client's side of a busy server: ``Retry-After`` honoured within the step's deadline."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

import shadowpeft.runtime.client as client_module
from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable
from shadowpeft.runtime.memory import (
    MemoryBudgetTooSmall,
    MemoryGuard,
    MemoryPlan,
    measure_step_peak,
    plan_memory,
)
from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request
from shadowpeft.runtime.serve_cli import main as serve_main
from shadowpeft.runtime.server import ServerConfig, create_app
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_server import MODEL, TOKEN, _auth, export, ref  # noqa: F401

MIB = 1 << 20


def _plan(budget: int = 100 * MIB, reserve: int = 10 * MIB) -> MemoryPlan:
    return MemoryPlan(budget=budget, baseline=40 * MIB, kv_budget=20 * MIB, reserve=reserve, concurrent=4, tokens=64)


def test_the_plan_adds_graphs_kv_and_requests_in_flight_and_names_what_to_change() -> None:
    assert _plan().required == 40 * MIB + 20 * MIB + 4 * 10 * MIB
    _plan(budget=100 * MIB).check()  # exactly enough
    with pytest.raises(MemoryBudgetTooSmall) as info:
        _plan(budget=99 * MIB).check()
    message = str(info.value)
    assert "graphs loaded 40 MiB + KV budget 20 MiB" in message and "4 requests in flight" in message
    assert "at least 100 MiB" in message and "--kv-budget" in message and "--max-concurrent" in message


def test_the_guard_admits_while_rss_leaves_room_trims_then_refuses_with_retry_after() -> None:
    rss, trims = [50 * MIB], []

    def trim() -> bool:
        trims.append(rss[0])
        rss[0] -= 5 * MIB  # the heap had 5 MiB to give back
        return True

    guard = MemoryGuard(_plan(), rss=lambda: rss[0], trim=trim)
    guard.admit(in_flight=4)  # 50 + 4 x 10 <= 100
    assert not trims and guard.refused == 0
    rss[0] = 62 * MIB  # 62 + 40 > 100, trimmed to 57: fits
    guard.admit(in_flight=4)
    assert trims == [62 * MIB] and guard.refused == 0
    rss[0] = 80 * MIB  # 80 + 30 > 100 even after trimming to 75
    with pytest.raises(ServerRejected, match="--memory-budget 100 MiB") as info:
        guard.admit(in_flight=3)
    assert info.value.status == 503 and info.value.retry_after == 1 and guard.refused == 1
    guard.released()
    assert guard.stats()["peak_rss_bytes"] == 80 * MIB and guard.stats()["refused"] == 1


def test_a_step_peak_is_measured_while_it_runs() -> None:
    def step() -> None:
        block = np.ones(64 * MIB // 8)  # 64 MiB, touched, freed before the step returns
        time.sleep(0.05)
        del block

    assert measure_step_peak(step) >= 48 * MIB
    assert measure_step_peak(lambda: None) < 16 * MIB


def test_planning_measures_the_warm_up_and_refuses_a_budget_it_does_not_fit() -> None:
    plan = plan_memory(10 * 1 << 30, lambda: None, kv_budget=MIB, concurrent=2, tokens=8, request_bytes=3 * MIB)
    assert plan.reserve >= 3 * MIB and plan.baseline > 0 and plan.required <= plan.budget
    with pytest.raises(MemoryBudgetTooSmall, match="--memory-budget"):
        plan_memory(MIB, lambda: None, kv_budget=MIB, concurrent=2, tokens=8, request_bytes=MIB)


def test_shadow_serve_refuses_to_start_with_a_budget_below_its_graphs(toy_export) -> None:
    result = CliRunner().invoke(
        serve_main, [str(toy_export.export), "--memory-budget", "1MiB"], env={"SHADOW_SERVE_TOKEN": TOKEN}
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "cannot hold this server" in output and "Raise --memory-budget" in output


def test_a_server_over_its_memory_budget_answers_503_and_serves_again_when_memory_is_back(export, ref) -> None:  # noqa: F811
    app = create_app(export, ServerConfig(TOKEN, memory_budget=4 << 30))
    guard = app.state.backbone.memory
    assert guard.plan.reserve > 0 and guard.plan.baseline > 0
    ids = ref.tokens(3)
    body, size = encode_request(
        {"input_ids": ids, "shadow_states": ref.s0(ids)}, parameters={"sequence_id": 7, "sequence_start": True}
    )
    headers = {HEADER_LENGTH: str(size), **_auth()}
    real_rss = guard._rss
    with serve_in_thread(app) as url:
        infer = f"{url}/v2/models/{MODEL}/infer"
        guard._rss = lambda: 5 << 30  # as if the process held 5 GiB
        refused = httpx.post(infer, content=body, headers=headers, timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "--memory-budget 4096 MiB" in refused.json()["error"]
        guard._rss = real_rss
        assert httpx.post(infer, content=body, headers=headers, timeout=30).status_code == 200
        stats = httpx.get(f"{url}/v2/models/{MODEL}/stats", headers=_auth()).json()
    assert stats["refused"]["memory"] == 1 and stats["model_stats"][0]["inference_count"] == 1
    assert stats["memory"]["budget_bytes"] == 4 << 30 and stats["memory"]["peak_rss_bytes"] >= 5 << 30


def _busy_then_ok(retry_after: str):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return httpx.Response(503, headers={"Retry-After": retry_after}, json={"error": "busy"})
        return httpx.Response(200, json={"name": MODEL, "inputs": [], "outputs": []})

    return calls, httpx.MockTransport(handler)


def test_the_client_waits_as_long_as_retry_after_asks(monkeypatch) -> None:
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    calls, transport = _busy_then_ok("2")
    with BackboneClient("http://server", backoff=0.1, retries=2, transport=transport) as client:
        assert client.metadata()["name"] == MODEL
    assert len(calls) == 2 and slept and 2.0 <= slept[0] < 2.5  # not the 0.1 s backoff
    slept.clear()
    calls, transport = _busy_then_ok("soon")  # not a number of seconds: the backoff applies
    with BackboneClient("http://server", backoff=0.1, retries=2, transport=transport) as client:
        client.metadata()
    assert slept and slept[0] < 0.2


def test_the_client_does_not_wait_past_its_deadline_for_a_retry_after(monkeypatch) -> None:
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    calls, transport = _busy_then_ok("3600")
    with BackboneClient("http://server", backoff=0.1, retries=2, transport=transport) as client:
        with pytest.raises(ServerUnavailable, match="HTTP 503"):
            client.metadata(deadline=time.monotonic() + 5)
    assert len(calls) == 1 and not slept  # capped at 30 s, still past the 5 s deadline: no retry
