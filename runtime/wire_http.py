"""``BackboneClient``'s HTTP wire: one attempt of each request to ``shadow-serve`` over KServe v2 HTTP (httpx).

Tensors travel as binary data both ways (the binary tensor extension). Each method makes one
attempt and maps what came back (:class:`~shadowpeft.runtime.client.BackboneClient` retries)::

    transport error, 502/503/504       -> Retryable (retried; ServerUnavailable when none is left)
    409                                -> SessionLost (re-send the history with sequence_start)
    other 4xx                          -> ServerRejected, with the server's message and status
    other 5xx, a malformed answer      -> ServerUnavailable
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import numpy as np

from shadowpeft.runtime.contract import HIDDEN_STATES
from shadowpeft.runtime.errors import (
    ProtocolError,
    Retryable,
    ServerRejected,
    ServerUnavailable,
    SessionLost,
    retry_after_seconds,
)
from shadowpeft.runtime.protocol import HEADER_LENGTH, decode_response, encode_request, parse_header_length

__all__ = ["HttpWire"]

_RETRY_STATUSES = (502, 503, 504)


class HttpWire:
    """KServe v2 over HTTP/1.1 to one server.

    Args:
        url: Base URL, ``http://`` or ``https://``.
        token: Bearer token, or ``None``.
        timeout: Default seconds per request.
        transport: An httpx transport (tests), else one with TCP_NODELAY.
        count: Called with (bytes sent, bytes received) after every attempt, as HTTP/1.1 frames them.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        timeout: float,
        transport: httpx.BaseTransport | None,
        count: Callable[[int, int], None],
    ) -> None:
        self.url, self.count = url, count
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # TCP_NODELAY: httpx writes headers and body separately, and Nagle's algorithm holds the body back
        # until the headers are acknowledged (on loopback: p50 3-4 ms per one-token step without it, 1.4 ms with).
        transport = transport or httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def where(self, operation: str, model_name: str) -> str:
        """The request an operation (``infer``, ``metadata``, ``ready``, ``stats``) makes, for messages."""
        models = f"/v2/models/{model_name}"
        paths = {"infer": f"POST {models}/infer", "metadata": f"GET {models}", "stats": f"GET {models}/stats"}
        return paths.get(operation, "GET /v2/health/ready")

    def infer(
        self, model_name: str, parameters: Mapping[str, Any], inputs: Mapping[str, np.ndarray], *, timeout: float
    ) -> np.ndarray:
        """One infer request; returns ``hidden_states`` as sent (the request's wire dtype)."""
        body, json_size = encode_request(inputs, parameters=parameters, outputs={HIDDEN_STATES: True})
        headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(json_size)}
        path = f"/v2/models/{model_name}/infer"
        response = self._send("POST", path, timeout=timeout, content=body, headers=headers)
        try:
            size = parse_header_length(response.headers.get(HEADER_LENGTH), len(response.content))
            return decode_response(response.content, size).outputs[HIDDEN_STATES]
        except (ProtocolError, KeyError) as err:
            raise ServerUnavailable(
                f"{self.url} sent a malformed inference response ({err}); is it shadow-serve?"
            ) from err

    def ready(self, model_name: str, *, timeout: float) -> bool:
        """Whether the server is ready and serves the model."""
        live = self._send("GET", "/v2/health/ready", timeout=timeout)
        model = self._send("GET", f"/v2/models/{model_name}/ready", timeout=timeout)
        return live.status_code == 200 and model.status_code == 200

    def metadata(self, model_name: str, *, timeout: float) -> dict[str, Any]:
        """The model metadata (with the ``shadowpeft`` object shadow-serve adds)."""
        response = self._send("GET", f"/v2/models/{model_name}", timeout=timeout)
        try:
            metadata = response.json()
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise ServerUnavailable(f"{self.url} sent model metadata that is no JSON object; is it shadow-serve?")
        return metadata

    def stats(self, model_name: str, *, timeout: float) -> dict[str, Any]:
        """The model statistics (shadow-serve's, with ``sequences``, ``requests`` and ``refused``)."""
        return self._send("GET", f"/v2/models/{model_name}/stats", timeout=timeout).json()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, *, timeout: float, **kwargs: Any) -> httpx.Response:
        """One attempt: a 2xx response, or the error for what came back (see the module docstring)."""
        try:
            response = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TransportError as err:
            self.count(len(kwargs.get("content", b"")), 0)
            raise Retryable(f"{type(err).__name__}: {err or 'no detail'}") from err
        self.count(_request_size(response.request), _response_size(response))
        if response.status_code in _RETRY_STATUSES:
            raise Retryable(f"HTTP {response.status_code}: {_message(response)}", retry_after=_retry_after(response))
        return _checked(response, self.url)


def _retry_after(response: httpx.Response) -> float:
    """Seconds the response's ``Retry-After`` asks for (0 when absent or not a number of seconds)."""
    return retry_after_seconds(response.headers.get("retry-after"))


def _checked(response: httpx.Response, url: str) -> httpx.Response:
    status = response.status_code
    if 200 <= status < 300:
        return response
    message = _message(response)
    if status == 409:
        raise SessionLost(message)
    if 400 <= status < 500:
        raise ServerRejected(f"{url} refused the request (HTTP {status}): {message}", status=status)
    raise ServerUnavailable(f"{url} failed (HTTP {status}): {message}")


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return error if isinstance(error, str) else response.text[:200] or response.reason_phrase


def _request_size(request: httpx.Request) -> int:
    line = len(request.method) + len(request.url.raw_path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2 + len(request.content)


def _response_size(response: httpx.Response) -> int:
    line = len(f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n")
    return line + sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2 + len(response.content)
