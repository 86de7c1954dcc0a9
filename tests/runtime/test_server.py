"""The backbone server and its client against the local cloud/backbone graph (runtime/server.py, client.py).

Servers run in-process with uvicorn on a free loopback port (one per test, sharing the export's
onnxruntime session); the kill test runs ``shadow-serve`` in a subprocess with torch blocked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from shadowpeft.runtime.admission import RequestLimits
from shadowpeft.runtime.client import BackboneClient, new_sequence_id
from shadowpeft.runtime.errors import ServerRejected, ServerUnavailable, SessionLost
from shadowpeft.runtime.export_dir import ExportDir, open_export
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request
from shadowpeft.runtime.serve_cli import main as serve_main
from shadowpeft.runtime.server import ServerConfig, create_app
from shadowpeft.runtime.sessions import SessionLimits
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_torch_free import BLOCKER

TOKEN = "test-token-0123456789abcdef"
MODEL = "shadow-backbone"
FP32_TOL = 1e-5  # cached chunked steps vs one full pass, both fp32 in onnxruntime: ~1e-6 apart
# fp16 wire: s0 and hidden_states are rounded to fp16 (relative error 2**-11 ~ 5e-4). The reference
# gets the same rounded s0, so what remains is the rounding of hidden values of magnitude < ~10
# (final-normed, toy RMSNorm weights ~1): < 10 * 2**-11 = 5e-3; 2e-2 leaves room for larger norms.
FP16_TOL = 2e-2


@dataclass
class Running:
    url: str
    app: Any = None

    def client(self, **options) -> BackboneClient:
        return BackboneClient(self.url, token=TOKEN, **options)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v2/models/{MODEL}/stats", headers=_auth()).json()["sequences"]


@contextlib.contextmanager
def running(
    export: ExportDir, *, token: str | None = TOKEN, max_body_bytes: int = 1 << 20, requests=None, **limits
) -> Iterator:
    """A server on a free port; ``limits`` go to SessionLimits, ``requests`` (a dict) to RequestLimits."""
    request_limits = RequestLimits(**{"max_body_bytes": max_body_bytes, **(requests or {})})
    app = create_app(export, ServerConfig(token, SessionLimits(**limits), request_limits))
    with serve_in_thread(app) as url:
        yield Running(url, app)


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def export(toy_export) -> ExportDir:
    return open_export(toy_export.export)


class Reference:
    """Local graphs: device/shadow gives s0 for a token sequence, cloud/backbone the expected hidden states."""

    def __init__(self, export: ExportDir) -> None:
        self.export = export
        self.rng = np.random.default_rng(0)

    def tokens(self, count: int) -> np.ndarray:
        return self.rng.integers(4, 200, (1, count), dtype=np.int64)

    def _run(self, key: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        spec = self.export.graph(key)
        length = feeds["input_ids"].shape[1]
        feeds = {**feeds, "attention_mask": np.ones((1, length), np.int64), "position_ids": np.arange(length)[None]}
        for item in spec.inputs:
            if item.name.startswith("past_key_values."):
                feeds[item.name] = np.zeros((1, item.shape[1], 0, item.shape[3]), np.float32)
        return self.export.session(key).run([output], feeds)[0]

    def s0(self, ids: np.ndarray) -> np.ndarray:
        return self._run("device/shadow", {"input_ids": ids}, "shadow_states")  # (1, T, d)

    def hidden(self, ids: np.ndarray, s0: np.ndarray) -> np.ndarray:
        return self._run("cloud/backbone", {"input_ids": ids, "shadow_states": s0}, "hidden_states")


@pytest.fixture(scope="module")
def ref(export) -> Reference:
    return Reference(export)


def _generate(client: BackboneClient, sequence_id, ids, s0, *, prompt: int) -> np.ndarray:
    """Prefill ``prompt`` tokens in one (chunked) step, then one step per remaining token."""
    parts = [client.step(sequence_id, ids[:, :prompt], s0[:, :prompt], start=True)]
    for t in range(prompt, ids.shape[1]):
        parts.append(client.step(sequence_id, ids[:, t : t + 1], s0[:, t : t + 1], start=False))
    return np.concatenate(parts, axis=1)


def test_client_chunked_prefill_and_decode_match_the_local_graph(export, ref) -> None:
    ids = ref.tokens(12)
    s0 = ref.s0(ids)
    expected = {"float32": ref.hidden(ids, s0), "float16": ref.hidden(ids, s0.astype(np.float16).astype(np.float32))}
    sent = {}
    with running(export) as server:
        for dtype, tolerance in (("float32", FP32_TOL), ("float16", FP16_TOL)):
            with server.client(dtype=dtype, max_chunk_tokens=3) as client:
                assert client.ready()  # two requests: server and model readiness
                sequence_id = client.new_sequence_id()
                hidden = _generate(client, sequence_id, ids, s0, prompt=7)  # chunks 3 + 3 + 1, then 5 steps
                assert hidden.dtype == np.float32 and hidden.shape == (1, 12, 32)
                assert np.abs(hidden - expected[dtype]).max() <= tolerance
                # 1: the metadata (the server's token cap) before the first prompt; 8: chunks 3 + 3 + 1, 5 steps
                assert client.requests == 2 + 1 + 8 and client.bytes_received > 0
                sent[dtype] = client.bytes_sent
                client.end(sequence_id)
        assert server.stats()["active"] == 0
    assert sent["float16"] < sent["float32"]


def test_tritonclient_talks_to_the_server(export, ref) -> None:
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    ids = ref.tokens(5)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids, s0)
    with running(export) as server:
        triton = InferenceServerClient(server.url.removeprefix("http://"))
        headers = _auth()
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.get_server_metadata(headers=headers)["name"] == "shadowpeft"
        metadata = triton.get_model_metadata(MODEL, model_version="1", headers=headers)
        assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "shadow_states"]
        assert metadata["outputs"][0]["shape"] == [1, -1, 32]
        assert triton.is_model_ready(MODEL, headers=headers)

        def infer(start: int, stop: int, *, dtype, binary: bool, first: bool, last: bool):
            inputs = [
                InferInput("input_ids", [1, stop - start], "INT64"),
                InferInput("shadow_states", [1, stop - start, 32], dtype),
            ]
            inputs[0].set_data_from_numpy(ids[:, start:stop], binary_data=binary)
            inputs[1].set_data_from_numpy(
                s0[:, start:stop].astype(np.float16 if dtype == "FP16" else np.float32), binary_data=binary
            )
            outputs = [InferRequestedOutput("hidden_states", binary_data=binary)]
            result = triton.infer(
                MODEL,
                inputs,
                outputs=outputs,
                sequence_id=77,
                sequence_start=first,
                sequence_end=last,
                headers=_auth(),  # tritonclient adds its own headers to this dict: a fresh one per call
            )
            return result.as_numpy("hidden_states")

        prefill = infer(0, 3, dtype="FP32", binary=True, first=True, last=False)
        step = infer(3, 4, dtype="FP32", binary=False, first=False, last=False)
        last = infer(4, 5, dtype="FP16", binary=True, first=False, last=True)
        assert last.dtype == np.float16 and prefill.dtype == np.float32
        assert np.abs(np.concatenate([prefill, step], axis=1) - expected[:, :4]).max() <= FP32_TOL
        assert np.abs(last.astype(np.float32) - expected[:, 4:]).max() <= FP16_TOL
        assert server.stats()["active"] == 0
        triton.close()


def _body(ids=None, s0=None, *, extra=None, outputs=None, **parameters) -> tuple[bytes, dict[str, str]]:
    """An infer request (valid unless told otherwise); ``s0=False`` leaves shadow_states out."""
    inputs = {"input_ids": np.array([[5, 6]]) if ids is None else ids}
    inputs["shadow_states"] = np.zeros((1, 2, 32), np.float32) if s0 is None else s0
    inputs = {k: v for k, v in {**inputs, **(extra or {})}.items() if v is not False}
    parameters = {"sequence_id": 1, "sequence_start": True, **parameters}
    body, size = encode_request(inputs, parameters=parameters, outputs=outputs)
    return body, {HEADER_LENGTH: str(size), **_auth()}


def _post(body_and_headers: tuple[bytes, dict], path: str = f"/v2/models/{MODEL}/infer", **headers) -> dict:
    body, base = body_and_headers
    return {"method": "POST", "url": path, "content": body, "headers": {**base, **headers}}


_OK = _body()
_RAW = {"method": "POST", "url": f"/v2/models/{MODEL}/infer", "headers": _auth()}
_WITHOUT_AUTH = (_OK[0], {HEADER_LENGTH: _OK[1][HEADER_LENGTH]})
# (case, httpx request kwargs, expected status, text expected in the JSON error)
BAD_REQUESTS = [
    ("missing token", _post(_WITHOUT_AUTH), 401, "needs a bearer"),
    ("wrong token", _post(_WITHOUT_AUTH, Authorization="Bearer nope-nope-nope-nope"), 401, "token is wrong"),
    ("metadata without token", {"method": "GET", "url": f"/v2/models/{MODEL}"}, 401, "bearer"),
    (
        "ids dtype",
        _post(_body(ids=np.array([[5, 6]], np.int32))),
        400,
        "'input_ids' has datatype INT32; expected INT64",
    ),
    ("s0 dtype", _post(_body(s0=np.zeros((1, 2, 32)))), 400, "datatype FP64; expected FP32 or FP16"),
    ("s0 shape", _post(_body(s0=np.zeros((1, 2, 31), np.float32))), 400, "shape [1, 2, 31]; expected [1, T, 32]"),
    ("ids shape", _post(_body(ids=np.array([[5], [6]]))), 400, "'input_ids' has shape [2, 1]; expected [1, T]"),
    ("T mismatch", _post(_body(ids=np.array([[5, 6, 7]]))), 400, "has 2 rows but 'input_ids' has 3 tokens"),
    ("missing input", _post(_body(s0=False)), 400, "input 'shadow_states' is missing"),
    ("extra input", _post(_body(extra={"position_ids": np.array([[0, 1]])})), 400, "unknown input 'position_ids'"),
    ("token id", _post(_body(ids=np.array([[5, 100000]]))), 400, "token id 100000; ids must be in [0, 213)"),
    ("nan s0", _post(_body(s0=np.full((1, 2, 32), np.nan, np.float32))), 400, "NaN"),
    ("no sequence id", _post(_body(sequence_id=None)), 400, "'sequence_id' must be an integer"),
    ("bool flag", _post(_body(sequence_end="yes")), 400, "'sequence_end' must be true or false"),
    ("oversized", {**_RAW, "content": b"x" * 70_000}, 413, "--max-body-bytes"),
    ("oversized chunked", {**_RAW, "content": [b"x" * 40_000] * 2}, 413, "limit of 65536 bytes"),
    ("unknown session", _post(_body(sequence_id=123456, sequence_start=False)), 409, "sequence_start=true"),
    ("garbage", {**_RAW, "content": b"\x00\xff garbage"}, 400, "not UTF-8"),
    ("bad json", {**_RAW, "content": b'{"inputs": ['}, 400, "not valid JSON"),
    ("header length", _post(_OK, **{HEADER_LENGTH: "999999"}), 400, HEADER_LENGTH),
    # These five were 500s: '²' and 5,000 digits pass str.isdigit() but not int(); the parser recursed
    # 1,000 levels deep; int() refuses over 4,300 digits.
    ("header length '²'", _post(_OK, **{HEADER_LENGTH: b"\xb2"}), 400, f"{HEADER_LENGTH} must be a decimal"),
    ("header length digits", _post(_OK, **{HEADER_LENGTH: "9" * 5000}), 400, f"{HEADER_LENGTH} must be a decimal"),
    ("header length empty", _post(_OK, **{HEADER_LENGTH: ""}), 400, f"{HEADER_LENGTH} must be a decimal"),
    ("deep json", {**_RAW, "content": b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"}, 400, "1001 levels"),
    ("huge integer", {**_RAW, "content": b'{"id": ' + b"9" * 5000 + b"}"}, 400, "integer of 5000 digits"),
    ("text/plain", _post(_OK, **{"Content-Type": "text/plain"}), 415, "'text/plain' is not an infer body"),
    ("gzip", _post(_OK, **{"Content-Encoding": "gzip"}), 415, "uncompressed"),
    ("unknown output", _post(_body(outputs={"logits": True})), 400, "returns only 'hidden_states'"),
    ("unknown model", _post(_OK, "/v2/models/gpt/infer"), 404, "Unknown model 'gpt'"),
    ("unknown version", _post(_OK, f"/v2/models/{MODEL}/versions/2/infer"), 404, "versions/2"),
    ("unknown route", {"method": "GET", "url": "/v2/nothing", "headers": _auth()}, 404, "Not Found: GET /v2/nothing"),
    ("wrong method", {**_RAW, "method": "GET"}, 405, "Method Not Allowed"),
]


def test_bad_requests_get_4xx_json_while_another_session_stays_correct(export, ref) -> None:
    ids = ref.tokens(40)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids, s0)
    stop, errors, steps = threading.Event(), [], [0]

    def steady() -> None:  # a well-behaved device generating token by token, restarting after 40 tokens
        with server.client(dtype="float32", max_chunk_tokens=4) as client:
            while not stop.is_set():
                try:
                    got = _generate(client, new_sequence_id(), ids, s0, prompt=4)
                    if np.abs(got - expected).max() > FP32_TOL:
                        errors.append(f"wrong hidden states, max diff {np.abs(got - expected).max()}")
                    steps[0] += 1
                except Exception as err:  # noqa: BLE001 - reported by the assertion below
                    errors.append(repr(err))
                    return

    with running(export, max_body_bytes=64 * 1024) as server:
        thread = threading.Thread(target=steady)
        thread.start()
        results = []
        with httpx.Client(base_url=server.url) as http:
            for case, request, status, text in BAD_REQUESTS:
                response = http.request(**request)
                body = response.json()
                results.append((case, response.status_code, body.get("error", "")))
                assert response.status_code == status, (case, body)
                assert text in body["error"], (case, body)
            assert http.get("/v2/health/live").status_code == 200  # health needs no token
        time.sleep(0.2)
        stop.set()
        thread.join(30)
    assert not errors and steps[0] >= 1, errors
    for case, status, message in results:
        print(f"{case:24} {status} {message.splitlines()[-1][:100] if message else ''}")


def test_cli_refusals(toy_export, tmp_path) -> None:
    runner = CliRunner()
    cases = [
        (["--no-auth", "--host", "0.0.0.0"], {}, "--no-auth is allowed only on a loopback host"),
        ([], {}, "needs a bearer token"),
        (["--token", "short"], {}, "use at least 16"),
        (["--no-auth", "--token", TOKEN], {}, "contradicts"),
    ]
    for args, env, message in cases:
        result = runner.invoke(serve_main, [str(toy_export.export), *args], env={"SHADOW_SERVE_TOKEN": None, **env})
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
    device_only = tmp_path / "device-only"
    manifest = Manifest.from_file(toy_export.export)
    graphs = {key: graph for key, graph in manifest.graphs.items() if key != "cloud/backbone"}
    data = {**manifest.to_dict(), "graphs": {k: g.to_dict() for k, g in graphs.items()}, "tokenizer_files": []}
    data["tokenizer_sha256"], data["interop_files"] = {}, None  # the graphs alone
    for graph in graphs.values():
        (device_only / graph.file).parent.mkdir(parents=True, exist_ok=True)
        (device_only / graph.file).write_bytes((toy_export.export / graph.file).read_bytes())
    Manifest.from_dict(data).write(device_only)
    result = runner.invoke(serve_main, [str(device_only)], env={"SHADOW_SERVE_TOKEN": TOKEN})
    assert result.exit_code == 1 and "has no 'cloud/backbone' graph" in result.output, result.output


def test_eviction_then_reprefill_matches_an_uninterrupted_run(export, ref) -> None:
    ids = ref.tokens(12)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids, s0)
    with running(export, max_sessions=1) as server, server.client(dtype="float32", max_chunk_tokens=4) as client:
        first, second = new_sequence_id(), new_sequence_id()
        got = [_generate(client, first, ids[:, :9], s0[:, :9], prompt=7)]
        client.step(second, ids[:, :3], s0[:, :3], start=True)  # evicts `first`
        with pytest.raises(SessionLost, match="evicted, least recently used"):
            client.step(first, ids[:, 9:10], s0[:, 9:10], start=False)
        got.append(client.step(first, ids[:, :10], s0[:, :10], start=True)[:, 9:])  # re-prefill + the new token
        got += [client.step(first, ids[:, t : t + 1], s0[:, t : t + 1], start=False) for t in (10, 11)]
        assert np.abs(np.concatenate(got, axis=1) - expected).max() <= FP32_TOL
        assert server.stats()["evicted"] == 2  # `second` went when `first` came back


def test_limits_idle_ttl_and_idempotent_retry(export, ref) -> None:
    ids = ref.tokens(9)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids, s0)
    with running(export, max_tokens=8, idle_ttl=0.3) as server, server.client(dtype="float32") as client:
        client.step(1, ids[:, :7], s0[:, :7], start=True)
        with pytest.raises(ServerRejected, match="would hold 9 tokens.*--max-tokens-per-session") as info:
            client.step(1, ids[:, 7:9], s0[:, 7:9], start=False)
        assert info.value.status == 400
        # A retry of a step whose response was lost (same offset) is answered again, not appended.
        body, size = encode_request(
            {"input_ids": ids[:, 7:8], "shadow_states": s0[:, 7:8]},
            parameters={"sequence_id": 1, "sequence_offset": 7},
        )
        headers = {HEADER_LENGTH: str(size), **_auth()}
        replies = [
            httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=headers) for _ in range(2)
        ]
        assert replies[0].content == replies[1].content and server.stats()["tokens"] == 8
        with pytest.raises(SessionLost, match="holds 8 tokens .* sequence_offset 9: client and server are out"):
            client._infer(1, ids[:, 8:9], s0[:, 8:9], False, 9)
        time.sleep(0.5)
        with pytest.raises(SessionLost, match="idle for more than 0.3 s"):
            client.step(1, ids[:, 8:9], s0[:, 8:9], start=False)
        assert server.stats()["expired"] == 1
        hidden = client.step(2, ids[:, :8], s0[:, :8], start=True)
        assert np.abs(hidden - expected[:, :8]).max() <= FP32_TOL


def test_a_smaller_offset_rolls_the_sequence_back_to_a_fresh_prefill(export, ref) -> None:
    """Speculative decoding's rollback: a step at a smaller sequence_offset drops the tokens after it first."""
    ids, other = ref.tokens(8), ref.tokens(3)
    s0 = ref.s0(ids)
    expected = ref.hidden(ids, s0)
    app = create_app(export, ServerConfig(TOKEN, SessionLimits(max_tokens=8)))
    with serve_in_thread(app) as url, BackboneClient(url, token=TOKEN, dtype="float32") as client:
        client.step(1, ids[:, :5], s0[:, :5], start=True)
        client.step(1, other, ref.s0(np.concatenate([ids[:, :5], other], axis=1))[:, 5:], start=False)  # 3 drafts
        client.rewind(1, 5)  # all three rejected
        hidden = client.step(1, ids[:, 5:8], s0[:, 5:8], start=False)  # 8 tokens held: within max_tokens
        assert np.abs(hidden - expected[:, 5:]).max() <= FP32_TOL
        session = app.state.backbone.table.get(1)
        app.state.backbone.table.release(session)
        fresh = app.state.backbone.runner.run(app.state.backbone.runner.empty_past(), ids, s0)[1]
        assert session.length == 8 and fresh.length == 8
        for name, value in fresh.past.items():
            assert np.abs(session.past.past[name] - value).max() <= FP32_TOL, name
        with pytest.raises(ValueError, match="rewind"):
            client.rewind(1, 9)
        client.end(1)


def test_load_16_sessions_x_32_tokens(export, ref) -> None:
    sessions, tokens = 16, 32
    ids = [ref.tokens(tokens) for _ in range(sessions)]
    s0 = [ref.s0(x) for x in ids]
    latencies, errors, results = [], [], [None] * sessions

    def device(index: int) -> None:
        with server.client(dtype="float16") as client:
            sequence_id, parts = new_sequence_id(), []
            try:
                for t in range(tokens):
                    began = time.perf_counter()
                    parts.append(
                        client.step(sequence_id, ids[index][:, t : t + 1], s0[index][:, t : t + 1], start=t == 0)
                    )
                    latencies.append(time.perf_counter() - began)
                client.end(sequence_id)
            except Exception as err:  # noqa: BLE001 - reported by the assertion below
                errors.append(repr(err))
            results[index] = np.concatenate(parts, axis=1) if parts else None

    with running(export) as server:
        threads = [threading.Thread(target=device, args=(i,)) for i in range(sessions)]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        wall = time.perf_counter() - began
        stats = server.stats()
    assert not errors, errors
    assert stats["active"] == 0 and stats["ended"] == sessions
    for index in range(sessions):
        expected = ref.hidden(ids[index], s0[index].astype(np.float16).astype(np.float32))
        assert np.abs(results[index] - expected).max() <= FP16_TOL
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    print(
        f"\nload: {sessions} sessions x {tokens} tokens in {wall:.2f} s; "
        f"per-token latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_killed_server_raises_server_unavailable_quickly(toy_export, ref) -> None:
    port = _free_port()
    code = (
        BLOCKER
        + "import sys\nimport shadowpeft.runtime.client\nfrom shadowpeft.runtime.serve_cli import main\nmain()\n"
    )
    args = [sys.executable, "-c", code, str(toy_export.export), "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "SHADOW_SERVE_TOKEN": TOKEN}
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = BackboneClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout=2.0, retries=2, backoff=0.05)
        deadline = time.monotonic() + 30
        while not client.ready():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "shadow-serve did not start within 30 s"
            time.sleep(0.1)
        ids = ref.tokens(4)
        s0 = ref.s0(ids)
        client.step(5, ids[:, :3], s0[:, :3], start=True)
        process.kill()
        process.wait(10)
        began = time.monotonic()
        with pytest.raises(ServerUnavailable, match="after 3 attempt"):
            client.step(5, ids[:, 3:], s0[:, 3:], start=False)
        assert time.monotonic() - began < 2.0 and not client.ready()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
    output = process.stdout.read()
    assert "blocked" not in output, output  # the server never tried to import torch
