"""The backbone server's limits (runtime/admission.py, the KV budget of runtime/sessions.py) over HTTP.

Tokens, body and JSON bytes per request are refused (413) before any table change or graph call; the
KV budget and a full server answer 503 with Retry-After and change nothing; refused or failed starts
leave every other sequence (and the old one under a restarted id) as it was; a sequence_end with a
stale offset frees its sequence. Servers run in-process on the toy export, as in test_server.py.
"""

from __future__ import annotations

import inspect
import re
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from shadowpeft.runtime.admission import RequestLimits, parse_size
from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.kv import kv_bytes_per_token
from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request
from shadowpeft.runtime.serve_cli import main as serve_main
from tests.runtime.test_server import FP32_TOL, MODEL, TOKEN, _auth, export, ref, running  # noqa: F401

DERIVED = {"max_body_bytes": None}  # the body limit follows from the tokens per request


def _infer(url: str, sequence_id, ids, s0, *, start=False, end=False, offset=None) -> httpx.Response:
    parameters = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    if offset is not None:
        parameters["sequence_offset"] = offset
    body, size = encode_request({"input_ids": ids, "shadow_states": s0}, parameters=parameters)
    headers = {HEADER_LENGTH: str(size), **_auth()}
    return httpx.post(f"{url}/v2/models/{MODEL}/infer", content=body, headers=headers, timeout=30)


def _stats(server) -> dict:
    return httpx.get(f"{server.url}/v2/models/{MODEL}/stats", headers=_auth()).json()


def _per_token(export) -> int:  # noqa: F811
    return kv_bytes_per_token(export.graph("cloud/backbone"))


def test_a_request_over_the_token_cap_is_refused_before_any_compute(export, ref) -> None:  # noqa: F811
    assert inspect.signature(BackboneClient).parameters["max_chunk_tokens"].default <= RequestLimits().max_tokens
    ids = ref.tokens(6)
    s0 = ref.s0(ids)
    with running(export, requests={"max_tokens": 4, "max_json_bytes": 1024, **DERIVED}) as server:
        with server.client(dtype="float32", max_chunk_tokens=8) as client:
            client.step("idle", ids[:, :2], s0[:, :2], start=True)
        refused = _infer(server.url, 1, ids, s0, start=True)  # a client that ignores the published cap
        assert refused.status_code == 413
        assert re.search(r"carries 6 tokens.*at most 4 per request .*in chunks", refused.json()["error"])
        stats = _stats(server)
        assert stats["model_stats"][0]["inference_count"] == 1 and stats["refused"]["tokens_per_request"] == 1
        assert stats["sequences"]["active"] == 1 and stats["sequences"]["evicted"] == 0
        big = np.zeros((1, 40), np.int64), np.zeros((1, 40, 32), np.float32)  # a body no 4-token request needs
        response = _infer(server.url, 2, *big, start=True)
        assert response.status_code == 413, response.text
        assert (
            "Content-Length" in response.json()["error"] and "at most 4 tokens per request" in response.json()["error"]
        )
        with server.client(dtype="float32", max_chunk_tokens=4) as client:  # the same prompt in chunks
            hidden = client.step(1, ids, s0, start=True)
        assert np.abs(hidden - ref.hidden(ids, s0)).max() <= FP32_TOL
        assert _stats(server)["refused"]["body_bytes"] == 1


def test_a_json_body_over_the_json_cap_is_refused_before_parsing(export) -> None:  # noqa: F811
    with running(export, requests={"max_json_bytes": 2048, **DERIVED}) as server:
        url = f"{server.url}/v2/models/{MODEL}/infer"
        not_json = b"[" * 10_000  # parsed, it would be a 400; refused unread, a 413
        response = httpx.post(url, content=not_json, headers=_auth())
        assert response.status_code == 413 and "--max-json-bytes" in response.json()["error"]
        assert "binary" in response.json()["error"]
        chunked = httpx.post(url, content=iter([b"[" * 1500] * 2), headers=_auth())  # no Content-Length
        assert chunked.status_code == 413 and "--max-json-bytes" in chunked.json()["error"]
        header = httpx.post(url, content=b"{}", headers={HEADER_LENGTH: "4096", **_auth()})
        assert header.status_code == 413 and "JSON header" in header.json()["error"]
        assert _stats(server)["refused"]["json_bytes"] == 3


def test_the_kv_budget_evicts_idle_lru_sequences_only_when_that_makes_room(export, ref) -> None:  # noqa: F811
    per_token = _per_token(export)
    assert per_token == 3 * 2 * 2 * 8 * 4  # the toy: layers x (key, value) x KV heads x head_dim x fp32
    ids = ref.tokens(10)
    s0 = ref.s0(ids)
    with running(export, kv_budget_bytes=10 * per_token, requests=DERIVED) as server:
        backbone, release = server.app.state.backbone, threading.Event()
        run = backbone.runner.run

        def held_in_flight(past, step_ids, step_s0):  # the 1-token step of "x" waits: "x" stays busy
            if step_ids.shape[1] == 1:
                release.wait(30)
            return run(past, step_ids, step_s0)

        backbone.runner.run = held_in_flight
        for name, count in (("a", 4), ("b", 4), ("c", 5)):  # 4 + 4 + 5 > 10: "a" goes, and that is enough
            assert _infer(server.url, name, ids[:, :count], s0[:, :count], start=True).status_code == 200
        lost = _infer(server.url, "a", ids[:, 4:5], s0[:, 4:5], offset=4)
        assert lost.status_code == 409 and "--kv-budget" in lost.json()["error"]
        stats = _stats(server)["sequences"]
        assert (stats["evicted"], stats["kv_bytes"], stats["kv_budget_bytes"]) == (1, 9 * per_token, 10 * per_token)
        in_flight = threading.Thread(
            target=_infer, args=(server.url, "x", ids[:, :1], s0[:, :1]), kwargs={"start": True}
        )
        in_flight.start()
        while _stats(server)["sequences"]["kv_bytes"] < 10 * per_token:  # "x" admitted: 1 token reserved
            time.sleep(0.01)
        refused = _infer(server.url, "d", ids, s0, start=True)  # needs 10: evicting "b" and "c" frees 9
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "--kv-budget" in refused.json()["error"]
        stats = _stats(server)
        assert stats["sequences"]["evicted"] == 1 and stats["refused"]["kv_budget"] == 1  # nobody evicted
        assert _infer(server.url, "d", ids[:, :4], s0[:, :4], start=True).status_code == 200  # "b" goes
        assert _infer(server.url, "c", ids[:, :0], s0[:, :0], offset=5).status_code == 200  # "c" stayed
        assert _infer(server.url, "b", ids[:, 4:5], s0[:, 4:5], offset=4).status_code == 409
        release.set()
        in_flight.join(30)
        assert _stats(server)["sequences"]["kv_bytes"] == 10 * per_token  # c 5 + d 4 + x 1


def test_refused_starts_take_no_slot_and_evict_nobody(export, ref) -> None:  # noqa: F811
    ids = ref.tokens(17)
    s0 = ref.s0(ids)
    nan = np.full((1, 2, 32), np.nan, np.float32)
    with running(export, max_sessions=2, max_tokens=8, requests={"max_tokens": 16, **DERIVED}) as server:
        with server.client(dtype="float32") as client:
            for sequence_id in ("a", "b"):
                client.step(sequence_id, ids[:, :2], s0[:, :2], start=True)
            for _ in range(5):  # a full table of idle sequences, and starts refused for every reason
                assert _infer(server.url, "new", ids, s0, start=True).status_code == 413  # 17 > 16 per request
                assert _infer(server.url, "new", ids[:, :9], s0[:, :9], start=True).status_code == 400  # 9 > 8
                assert _infer(server.url, "new", ids[:, :2], s0[:, :2], start=True, offset=4).status_code == 409
                assert _infer(server.url, "new", ids[:, :2], nan, start=True).status_code == 400
            stats = _stats(server)
            assert (stats["sequences"]["active"], stats["sequences"]["evicted"]) == (2, 0)
            assert stats["refused"]["tokens_per_request"] == 5
            for sequence_id in ("a", "b"):
                hidden = client.step(sequence_id, ids[:, 2:3], s0[:, 2:3], start=False)
                assert np.abs(hidden - ref.hidden(ids[:, :3], s0[:, :3])[:, 2:]).max() <= FP32_TOL


def test_a_failed_restart_keeps_the_old_sequence_usable(export, ref) -> None:  # noqa: F811
    ids = ref.tokens(9)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids[:, :7], s0[:, :7])
    with running(export, max_tokens=8, requests=DERIVED) as server, server.client(dtype="float32") as client:
        client.step("a", ids[:, :5], s0[:, :5], start=True)
        too_long = _infer(server.url, "a", ids[:, :9], s0[:, :9], start=True)  # 9 > 8 tokens per sequence
        assert too_long.status_code == 400 and "--max-tokens-per-session" in too_long.json()["error"]
        backbone = server.app.state.backbone
        run = backbone.runner.run

        def failing(*args):
            raise ort.capi.onnxruntime_pybind11_state.Fail("injected failure")

        backbone.runner.run = failing
        broken = _infer(server.url, "a", ids[:, :3], s0[:, :3], start=True)
        assert broken.status_code == 500 and "cache is unchanged" in broken.json()["error"]
        backbone.runner.run = run
        got = [client.step("a", ids[:, t : t + 1], s0[:, t : t + 1], start=False) for t in (5, 6)]
        assert np.abs(np.concatenate(got, axis=1) - expected[:, 5:]).max() <= FP32_TOL
        stats = _stats(server)["sequences"]
        assert (stats["active"], stats["started"], stats["tokens"]) == (1, 1, 7)


def test_sequence_end_with_a_stale_offset_frees_the_sequence(export, ref) -> None:  # noqa: F811
    ids = ref.tokens(5)
    s0 = ref.s0(ids)
    with running(export, requests=DERIVED) as server:
        for name in ("a", "b"):
            assert _infer(server.url, name, ids, s0, start=True).status_code == 200
        ended = _infer(server.url, "a", ids[:, :0], s0[:, :0], end=True, offset=9)  # the client lost count
        assert ended.status_code == 200, ended.text
        stale = _infer(server.url, "b", ids[:, :1], s0[:, :1], end=True, offset=7)  # tokens out of sync: 409 ...
        assert stale.status_code == 409
        stats = _stats(server)["sequences"]
        assert (stats["active"], stats["ended"], stats["kv_bytes"]) == (0, 2, 0)  # ... and freed all the same


def test_a_full_server_answers_503_with_retry_after_and_health_stays_responsive(export, ref) -> None:  # noqa: F811
    ids = ref.tokens(2)
    body, size = encode_request({"input_ids": ids, "shadow_states": ref.s0(ids)}, parameters={"sequence_id": 1})
    url, headers = f"/v2/models/{MODEL}/infer", {HEADER_LENGTH: str(size), **_auth()}
    proceed, replies = threading.Event(), []

    def slow_body():  # holds the one place while its body trickles in
        yield body[:10]
        proceed.wait(30)
        yield body[10:]

    with running(export, requests={"max_concurrent": 1, "max_queued": 0, **DERIVED}) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            first = threading.Thread(
                target=lambda: replies.append(http.post(url, content=slow_body(), headers=headers))
            )
            first.start()
            while _stats(server)["requests"]["in_flight"] < 1:
                time.sleep(0.01)
            busy = httpx.post(f"{server.url}{url}", content=body, headers=headers)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "--max-concurrent 1" in busy.json()["error"]
            assert httpx.get(f"{server.url}/v2/health/live", timeout=2).status_code == 200
            proceed.set()
            first.join(30)
        assert replies[0].status_code == 409  # sequence 1 was never started: the request got through
        assert _stats(server)["refused"]["busy"] == 1


def test_size_options_read_units_and_refuse_a_budget_too_small_for_one_request(toy_export) -> None:
    assert parse_size("1GiB") == 1 << 30 and parse_size("512 MiB") == 512 << 20 and parse_size("2GB") == 2 * 10**9
    assert parse_size("1048576") == 1 << 20
    with pytest.raises(ValueError, match="Cannot read 'lots' as a size"):
        parse_size("lots")
    runner = CliRunner()
    for args, message in (
        (["--kv-budget", "lots"], "Cannot read 'lots' as a size"),
        (["--kv-budget", "1KiB"], "cannot hold even one request of"),
    ):
        result = runner.invoke(serve_main, [str(toy_export.export), *args], env={"SHADOW_SERVE_TOKEN": TOKEN})
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_the_server_gives_memory_back_after_a_large_step(toy_export, monkeypatch) -> None:
    """shadow-serve opens its graph without onnxruntime's CPU arena, which would keep the memory of the largest
    step ever run (measured: runtime.export_dir.session_options)."""
    import shadowpeft.runtime.export_dir as export_dir
    import shadowpeft.runtime.server as server
    from shadowpeft.runtime.export_dir import open_export

    session = open_export(toy_export.export, cpu_arena=False).session("cloud/backbone")
    assert session.get_session_options().enable_cpu_mem_arena is False
    assert open_export(toy_export.export).session("cloud/backbone").get_session_options().enable_cpu_mem_arena
    opened = []

    def recording_open(*args, **kwargs):
        opened.append(kwargs)
        return open_export(*args, **kwargs)

    monkeypatch.setattr(export_dir, "open_export", recording_open)
    monkeypatch.setattr(server, "run_server", lambda *a, **k: None)
    result = CliRunner().invoke(serve_main, [str(toy_export.export), "--no-auth"])
    assert result.exit_code == 0, result.output
    assert opened[0]["cpu_arena"] is False and opened[0]["spin_wait"] is False


def test_the_client_sends_chunks_no_larger_than_the_servers_published_cap(export, ref) -> None:  # noqa: F811
    ids = ref.tokens(10)
    s0 = ref.s0(ids)
    with running(export, requests={"max_tokens": 4, **DERIVED}) as server:
        with server.client(dtype="float32", max_chunk_tokens=8) as client:
            hidden = client.step(1, ids, s0, start=True)
            assert client.requests == 1 + 3  # the metadata once, then chunks of 4, 4 and 2 tokens
            client.step(1, ids[:, :1], s0[:, :1], start=False)
            assert client.requests == 5  # one-token steps fetch nothing more
        stats = _stats(server)
    assert np.abs(hidden - ref.hidden(ids, s0)).max() <= FP32_TOL
    assert stats["refused"]["tokens_per_request"] == 0 and stats["model_stats"][0]["inference_count"] == 4
