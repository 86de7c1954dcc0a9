"""shadow-serve's connection limits (runtime/connections.py), with real sockets against uvicorn in a thread.

A stand-in ASGI app answers every request, so these tests need no export; the read deadline of a
request *body* sits in the app's middleware and is tested in test_access.py.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator

import click
import httpx
import pytest

from shadowpeft.runtime import serve_cli
from shadowpeft.runtime.connections import DESCRIPTORS_PER_CONNECTION, ConnectionLimits, uvicorn_options
from tests.runtime.conftest import serve_in_thread

CAP = 4
READ_TIMEOUT = 1.0
LIMITS = ConnectionLimits(max_connections=CAP, read_timeout=READ_TIMEOUT, keep_alive_timeout=0.5)
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _ok(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _serving(limits: ConnectionLimits = LIMITS) -> Iterator[tuple[str, int]]:
    with serve_in_thread(_ok, options=uvicorn_options(limits)) as url:
        yield url, int(url.rsplit(":", 1)[1])


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _get(sock: socket.socket) -> bytes:
    """One GET on an open connection: the whole response (the stand-in app answers 'ok')."""
    sock.sendall(REQUEST)
    answer = b""
    while not answer.endswith(b"\r\n\r\nok"):
        answer += sock.recv(65536)
    return answer


def _trickle(sock: socket.socket, data: bytes, *, every: float = 0.2) -> bytes:
    """Sends ``data`` a byte every ``every`` seconds until the server answers; returns the answer."""
    for byte in data:
        sock.sendall(bytes([byte]))
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
    return _read_until_closed(sock)


def test_connections_over_the_cap_get_503_and_a_good_client_succeeds_afterwards() -> None:
    limits = ConnectionLimits(max_connections=CAP, read_timeout=3.0, keep_alive_timeout=0.5)
    with _serving(limits) as (url, port):
        idle = [_connect(port) for _ in range(CAP)]  # half-open: connected, never send a byte
        with httpx.Client(base_url=url) as client:  # sends its request at once, and still reads the 503
            refused = client.get("/")
        assert refused.status_code == 503 and "--max-connections" in refused.json()["error"], refused.text
        flood = [_connect(port) for _ in range(3 * CAP)]  # more than linger: the rest are closed at once
        answers = [_read_until_closed(sock) for sock in flood]
        assert all(answer.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in answer for answer in answers)
        closed = [_read_until_closed(sock) for sock in idle]  # the server drops them after the read timeout
        assert closed == [b""] * CAP  # nothing was sent, so nothing to answer: just closed
        with httpx.Client(base_url=url) as client:
            assert client.get("/").text == "ok"
        for sock in idle + flood:
            sock.close()


def test_request_headers_trickled_in_are_cut_off_after_the_read_timeout() -> None:
    slow = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    with _serving() as (_, port):
        began = time.monotonic()
        fresh = _connect(port)
        answer = _trickle(fresh, slow)
        took = time.monotonic() - began
        assert answer.startswith(b"HTTP/1.1 408 ") and b"--read-timeout" in answer, answer
        assert took >= READ_TIMEOUT  # a deadline from the connection's start, never earlier

        reused = _connect(port)  # the deadline is armed again for the next request on a kept-alive connection
        began = time.monotonic()
        assert _get(reused).startswith(b"HTTP/1.1 200 ")
        answer = _trickle(reused, slow)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - began >= READ_TIMEOUT
        fresh.close()
        reused.close()
    print(f"trickled headers answered 408 after {took:.2f} s (read timeout {READ_TIMEOUT} s)")


def test_a_kept_alive_connection_serves_requests_until_it_idles() -> None:
    with _serving() as (_, port):
        sock = _connect(port)
        for _ in range(3):
            assert _get(sock).startswith(b"HTTP/1.1 200 ")
        assert _read_until_closed(sock) == b""  # closed after keep_alive_timeout idle
        sock.close()


def test_connection_limits_are_validated() -> None:
    with pytest.raises(ValueError) as caught:
        ConnectionLimits(max_connections=0, read_timeout=0, keep_alive_timeout=float("inf"))
    message = str(caught.value)
    assert "max_connections must be an integer >= 1; got 0" in message
    assert "read_timeout must be a number of seconds > 0; got 0" in message
    assert "keep_alive_timeout must be a number of seconds > 0; got inf" in message


def test_the_descriptor_limit_is_raised_or_the_cap_refused(monkeypatch) -> None:
    import resource

    calls = []
    monkeypatch.setattr(resource, "setrlimit", lambda kind, limits: calls.append(limits))
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 4096))  # macOS-like soft limit
    serve_cli._check_descriptors(256)
    assert calls == [(DESCRIPTORS_PER_CONNECTION * 256 + serve_cli._SPARE_DESCRIPTORS, 4096)]
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 1024))
    serve_cli._check_descriptors(256)  # fits: nothing to do
    assert len(calls) == 1
    with pytest.raises(click.BadParameter, match=r"--max-connections 320 or less"):
        serve_cli._check_descriptors(1000)
