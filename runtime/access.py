"""Who may call ``shadow-serve`` and how: the ASGI middleware in front of every route.

Per request, in this order (the first refusal answers, as JSON ``{"error": ...}``)::

    auth off (--no-auth, loopback only):
        Host not 127.0.0.1 / ::1 / localhost at this server's port ──> 403  (DNS rebinding)
        Origin present and not a loopback page                     ──> 403  (a cross-site browser request)
    auth on:
        no or wrong bearer token (all routes but health)           ──> 401
    POST .../infer with a Content-Type other than
        application/json or application/octet-stream               ──> 415  (a form or text/plain POST)
    the body not complete within read_timeout                      ──> 408, connection closed

Why: a web page can make the browser POST ``text/plain``, form or type-less bodies to any address
without asking first (a CORS "simple request"), and a rebinding DNS name can point the page's own
origin at 127.0.0.1. With a token the browser cannot send ``Authorization`` cross-site without a
preflight this server never grants; without one, the Host and Origin checks keep pages out. Clients
that are not browsers (``BackboneClient``, ``tritonclient``, curl) send no ``Origin`` and a Host of
the address they dialled. A request without ``Content-Type`` is accepted: some KServe clients send
none, and a browser adds ``Origin`` to every cross-site POST.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from shadowpeft.runtime.errors import ServerRejected
from shadowpeft.runtime.protocol import HEADER_LENGTH

__all__ = ["LOG_KEY", "AccessGate", "bearer_problem"]

logger = logging.getLogger(__name__)

#: Scope key under which a route leaves details for the request's one log line.
LOG_KEY = "shadowpeft.log"
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
_BODY_TYPES = ("application/json", "application/octet-stream")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class AccessGate:
    """ASGI middleware: the checks above, a read deadline on the body, and one debug log line per request.

    Args:
        app: The app behind it.
        token: The bearer token to require, or ``None`` (auth off: the Host and Origin checks apply).
        read_timeout: Seconds the whole request body may take to arrive, from when its headers did.
    """

    def __init__(self, app: Any, *, token: str | None, read_timeout: float) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.read_timeout = read_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), [0]

        async def logged_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refusal = self._refusal(scope, _first_headers(scope))
        if refusal is not None:
            await _send_error(logged_send, *refusal)
        else:
            await self.app(scope, _with_deadline(receive, self.read_timeout), logged_send)
        elapsed = (time.perf_counter() - began) * 1000
        logger.debug(
            "%s %s -> %d %.1fms %s", scope["method"], scope["path"], status[0], elapsed, scope.get(LOG_KEY, "")
        )

    def _refusal(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[int, str, tuple] | None:
        """``(status, message, extra headers)`` of the first check the request fails, else ``None``."""
        if self.expected is None:
            problem = _cross_site_problem(scope, headers)
            if problem:
                return 403, problem, ()
        elif scope["path"] not in _OPEN_PATHS:
            message = bearer_problem(headers.get(b"authorization"), self.expected)
            if message is not None:
                return 401, message, ((b"www-authenticate", b"Bearer"),)
        content_type = headers.get(b"content-type")
        if scope["method"] == "POST" and scope["path"].endswith("/infer") and not _is_body_type(content_type):
            return (
                415,
                f"Content-Type {content_type.decode('latin-1')[:60]!r} is not an infer body. Send "
                f"'application/json' (all JSON) or 'application/octet-stream' (a JSON header and binary "
                f"tensors, with {HEADER_LENGTH}); a form or text/plain POST is what any web page can send.",
                (),
            )
        return None


def bearer_problem(given: bytes | None, expected: bytes) -> str | None:
    """Why an ``authorization`` value (an HTTP header, or gRPC metadata) does not carry the server's token
    (``expected``: ``b"Bearer TOKEN"``); ``None`` when it does. Compared in constant time."""
    if given is not None and hmac.compare_digest(given, expected):
        return None
    if given is not None:
        return (
            "The bearer token is wrong. Use the token shadow-serve was started with (--token or SHADOW_SERVE_TOKEN)."
        )
    return "This server needs a bearer token: send 'Authorization: Bearer TOKEN' (shadow-run --token)."


def _first_headers(scope: dict[str, Any]) -> dict[bytes, bytes]:
    """The request's headers by lower-case name; a repeated header counts with its first value."""
    headers: dict[bytes, bytes] = {}
    for key, value in scope["headers"]:
        headers.setdefault(key, value)
    return headers


def _is_body_type(content_type: bytes | None) -> bool:
    if content_type is None:  # see the module docstring
        return True
    return content_type.split(b";")[0].strip().lower().decode("latin-1") in _BODY_TYPES


def _cross_site_problem(scope: dict[str, Any], headers: dict[bytes, bytes]) -> str | None:
    """Without auth: why the request may come from a web page rather than a local client (``None``: it does not)."""
    host = headers.get(b"host", b"").decode("latin-1")
    server = scope.get("server")
    port = server[1] if server and len(server) > 1 else None
    if not _is_loopback_authority(host, port, _DEFAULT_PORTS.get(scope.get("scheme", "http"))):
        at = f"127.0.0.1:{port}" if port else "127.0.0.1"
        return (
            f"Host {host[:80]!r} is not this server's loopback address. Without auth (--no-auth) shadow-serve "
            f"answers only requests addressed to 127.0.0.1, ::1 or localhost at its own port (e.g. {at}), so "
            "that a web page cannot reach it under another name (DNS rebinding). Use that address, or serve "
            "with a token (SHADOW_SERVE_TOKEN) to accept other names."
        )
    origin = headers.get(b"origin")
    if origin is not None and not _is_loopback_origin(origin.decode("latin-1")):
        return (
            f"Origin {origin.decode('latin-1')[:80]!r}: without auth (--no-auth) shadow-serve refuses requests "
            "sent by web pages of other sites. Clients that are not browsers send no Origin header; to serve "
            "browsers, serve with a token (SHADOW_SERVE_TOKEN)."
        )
    return None


def _is_loopback_authority(authority: str, port: int | None, default_port: int | None) -> bool:
    """Whether a Host header names a loopback host and, when the server's port is known, that port."""
    if not authority or any(char in authority for char in "@/?#\\ "):
        return False
    try:
        parts = urlsplit(f"//{authority}")
        given = parts.port if parts.port is not None else default_port
    except ValueError:  # a port that is not a number in 0..65535
        return False
    return _is_loopback_name(parts.hostname) and (port is None or given == port)


def _is_loopback_origin(origin: str) -> bool:
    """Whether an Origin header is a page served from this machine (any port); ``null`` is not."""
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return parts.scheme in _DEFAULT_PORTS and _is_loopback_name(parts.hostname)


def _is_loopback_name(name: str | None) -> bool:
    if not name:
        return False
    if name.rstrip(".") == "localhost":  # urlsplit lower-cases it
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _with_deadline(receive: Any, seconds: float) -> Any:
    """``receive`` that raises a 408 :class:`ServerRejected` when the body is not complete ``seconds`` from now.

    uvicorn's h11 protocol has no read timeout of its own: a client sending a byte every few seconds
    would hold its connection, and the route reading its body, forever.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    done = False

    async def receive_in_time() -> dict[str, Any]:
        nonlocal done
        if done:  # after the body, receive() only reports a disconnect: no deadline
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise ServerRejected(
                f"The request body did not arrive within {seconds:g} s (--read-timeout of the server). Send it "
                "without pauses; on a slow link send fewer tokens per request.",
                status=408,
            ) from None
        done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_in_time


async def _send_error(send: Any, status: int, message: str, extra_headers: tuple = ()) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra_headers]})
    await send({"type": "http.response.body", "body": body})
