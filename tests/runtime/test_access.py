"""Who may call shadow-serve (runtime/access.py): Host and Origin without auth, infer Content-Types, body deadline."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from shadowpeft.runtime.client import BackboneClient, new_sequence_id
from shadowpeft.runtime.connections import ConnectionLimits
from shadowpeft.runtime.export_dir import ExportDir, open_export
from shadowpeft.runtime.protocol import HEADER_LENGTH, encode_request
from shadowpeft.runtime.server import ServerConfig, create_app
from tests.runtime.conftest import serve_in_thread

TOKEN = "test-token-0123456789abcdef"
INFER = "/v2/models/shadow-backbone/infer"
READ_TIMEOUT = 1.0
BODY, JSON_SIZE = encode_request(
    {"input_ids": np.array([[5, 6]]), "shadow_states": np.zeros((1, 2, 32), np.float32)},
    parameters={"sequence_id": 1, "sequence_start": True, "sequence_end": True},
)
BINARY = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(JSON_SIZE)}
EVIL_PAGE = {"Content-Type": "text/plain", "Origin": "http://evil.example", HEADER_LENGTH: str(JSON_SIZE)}


@pytest.fixture(scope="module")
def export(toy_export) -> ExportDir:
    return open_export(toy_export.export)


@contextlib.contextmanager
def _serving(export: ExportDir, token: str | None) -> Iterator[tuple[str, int]]:
    config = ServerConfig(token, connections=ConnectionLimits(read_timeout=READ_TIMEOUT))
    with serve_in_thread(create_app(export, config)) as url:
        yield url, int(url.rsplit(":", 1)[1])


def test_without_auth_only_loopback_clients_reach_the_server(export) -> None:
    with _serving(export, None) as (url, port):
        with BackboneClient(url, dtype="float32") as client:  # sends Host 127.0.0.1:PORT and octet-stream
            hidden = client.step(new_sequence_id(), np.array([[5, 6]]), np.zeros((1, 2, 32), np.float32), start=True)
        assert hidden.shape == (1, 2, 32)
        # (case, headers, expected status, text expected in the JSON error)
        cases = [
            ("a web page's text/plain POST", EVIL_PAGE, 403, "Origin 'http://evil.example'"),
            ("binary, from a web page", {**BINARY, "Origin": "http://evil.example"}, 403, "web pages of other sites"),
            ("sandboxed page", {**BINARY, "Origin": "null"}, 403, "Origin 'null'"),
            ("DNS rebinding", {**BINARY, "Host": f"evil.example:{port}"}, 403, "DNS rebinding"),
            ("another port", {**BINARY, "Host": "127.0.0.1:1"}, 403, f"e.g. 127.0.0.1:{port}"),
            ("no port", {**BINARY, "Host": "localhost"}, 403, "is not this server's loopback address"),
            ("text/plain, no Origin", {**EVIL_PAGE, "Origin": None}, 415, "'text/plain' is not an infer body"),
            ("form", {**BINARY, "Content-Type": "application/x-www-form-urlencoded"}, 415, "a form or text/plain"),
            ("localhost", {**BINARY, "Host": f"localhost:{port}"}, 200, ""),
            ("::1", {**BINARY, "Host": f"[::1]:{port}"}, 200, ""),
            ("a loopback page", {**BINARY, "Origin": "http://localhost:3000"}, 200, ""),
            ("no Content-Type", {HEADER_LENGTH: str(JSON_SIZE)}, 200, ""),
        ]
        with httpx.Client(base_url=url) as http:
            for case, headers, status, text in cases:
                response = http.post(INFER, content=BODY, headers={k: v for k, v in headers.items() if v})
                assert response.status_code == status, (case, response.text)
                assert status == 200 or text in response.json()["error"], (case, response.text)
            rebound = http.get("/v2/health/live", headers={"Host": "evil.example"})
            assert rebound.status_code == 403  # every route, health included
            json_body = encode_request(
                {"input_ids": np.array([[5]]), "shadow_states": np.zeros((1, 1, 32))}, binary=False
            )
            plain = http.post(INFER, content=json_body[0], headers={"Content-Type": "application/json; charset=utf-8"})
            assert plain.status_code == 400 and "sequence_id" in plain.json()["error"]  # past the gate: validated


def test_with_auth_the_token_decides_but_content_types_are_still_checked(export) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with _serving(export, TOKEN) as (url, port), httpx.Client(base_url=url) as http:
        assert http.post(INFER, content=BODY, headers=EVIL_PAGE).status_code == 401
        refused = http.post(INFER, content=BODY, headers={**EVIL_PAGE, **auth})
        assert refused.status_code == 415 and "text/plain" in refused.json()["error"]
        proxied = {**BINARY, **auth, "Host": "backbone.example.com", "Origin": "https://app.example.com"}
        assert http.post(INFER, content=BODY, headers=proxied).status_code == 200  # behind a proxy: any name


def test_a_body_trickled_in_is_answered_408_after_the_read_timeout(export) -> None:
    with _serving(export, None) as (url, port):
        began = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = (
            f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"{HEADER_LENGTH}: {JSON_SIZE}\r\nContent-Length: {len(BODY)}\r\n\r\n"
        )
        sock.sendall(head.encode())
        for byte in BODY:  # a byte every 0.2 s: the body would take minutes
            sock.sendall(bytes([byte]))
            if select.select([sock], [], [], 0.2)[0]:
                break
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
        took = time.monotonic() - began
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower(), answer
        assert b"--read-timeout" in answer
        assert took >= READ_TIMEOUT  # the deadline runs from the headers, sent after `began`
        with BackboneClient(url, dtype="float32") as client:  # the server is fine
            client.step(new_sequence_id(), np.array([[5]]), np.zeros((1, 1, 32), np.float32), start=True)
    print(f"a trickled body was answered 408 after {took:.2f} s (read timeout {READ_TIMEOUT} s)")
