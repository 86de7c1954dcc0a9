"""Connection limits of ``shadow-serve`` below the ASGI app: a cap on open connections, read deadlines.

uvicorn's HTTP/1.1 protocol (h11) holds a connection that sends nothing, or sends its request a
byte at a time, for as long as the peer likes, and accepts connections until the process runs out
of file descriptors. :class:`LimitedH11Protocol` bounds both, per connection::

    accepted ── max_connections already open? ── yes ──> 503, then closed (see "refused" below)
       │ no
       v
    request headers ── not complete within read_timeout ──> 408 (if any byte came), closed
       │ complete
       v
    the ASGI app: the body has its own read_timeout deadline (shadowpeft.runtime.access)
       │ response sent
       v
    keep-alive ── idle for keep_alive_timeout ──> closed (uvicorn); a next request: headers as above

Refused: closing a socket whose request is still unread makes TCP send a reset, which can destroy
the 503 before the client reads it. So a refused connection is read (and what it sends dropped)
until the client closes it or ``_LINGER_S`` passes; at most ``max_connections`` linger at once,
and beyond that (a flood) refused connections are closed at once.

File descriptors: asyncio accepts up to a listen backlog's worth of sockets before it looks at any
of them, and the backlog is ``max_connections`` too; so the server holds at most about three times
``max_connections`` connections at once (served, lingering, just accepted): 768 at the default 256,
under the common ``ulimit -n`` of 1024 (``shadow-serve`` checks the limit when it starts).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from shadowpeft.runtime.errors import format_problems

__all__ = ["ConnectionLimits", "LimitedH11Protocol", "uvicorn_options"]

logger = logging.getLogger(__name__)

#: Connections the server may hold at once, as a multiple of ``max_connections`` (see the module docstring).
DESCRIPTORS_PER_CONNECTION = 3
_LINGER_S = 2.0  # how long a refused connection is read before it is closed anyway
_WARN_EVERY_S = 10.0  # one warning per this many seconds while connections are refused


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections the server holds and how long it waits on each.

    Attributes:
        max_connections: Open connections at once; one more is answered 503 and closed.
        read_timeout: Seconds a request's headers may take to arrive, and then its body (408 after).
        keep_alive_timeout: Seconds an idle keep-alive connection stays open between requests.
    """

    max_connections: int = 256
    read_timeout: float = 10.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.max_connections, int) and self.max_connections >= 1):
            problems.append(f"max_connections must be an integer >= 1; got {self.max_connections!r}")
        for name in ("read_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                problems.append(f"{name} must be a number of seconds > 0; got {value!r}")
        if problems:
            raise ValueError(format_problems("Invalid connection limits:", problems))


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments that enforce ``limits`` (HTTP/1.1 over h11)."""
    return {
        "http": functools.partial(LimitedH11Protocol, limits=limits, refused=_Refused()),
        "timeout_keep_alive": limits.keep_alive_timeout,
        "backlog": limits.max_connections,
    }


@dataclass
class _Refused:
    """Refused connections, shared by one server's connections: those lingering, and a rate-limited warning."""

    lingering: int = 0
    since_warning: int = 0
    warned_at: float = float("-inf")

    def count(self, cap: int) -> None:
        self.since_warning += 1
        now = time.monotonic()
        if now - self.warned_at >= _WARN_EVERY_S:
            logger.warning(
                "refused %d connection(s) with 503: %d were open (--max-connections)", self.since_warning, cap
            )
            self.since_warning, self.warned_at = 0, now


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for each request's headers."""

    def __init__(self, *args: Any, limits: ConnectionLimits, refused: _Refused, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits, self.refused = limits, refused
        self._timer: asyncio.TimerHandle | None = None  # the header deadline, or the end of lingering
        self._awaited_after: object = None  # the request cycle before the one whose headers are awaited
        self._partial = False  # some bytes of the awaited request arrived
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) <= self.limits.max_connections:
            self._await_request()
            return
        self.connections.discard(self)  # a refused connection holds no place
        self.refused.count(self.limits.max_connections)
        message = (
            f"This server already holds {self.limits.max_connections} connections (--max-connections); retry in "
            "a moment, and keep one connection per client open (keep-alive)."
        )
        transport.write(_response(503, message))
        if self.refused.lingering >= self.limits.max_connections:  # a flood: free the descriptor now
            transport.close()
            return
        self.refused.lingering += 1
        self._lingering = True
        self._timer = self.loop.call_later(_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused: drop the request (the client closes once it read the 503)
            return
        self._partial = True
        super().data_received(data)
        if self._timer is not None and self.cycle is not self._awaited_after:
            self._cancel_timer()  # the headers are in: the app's body deadline takes over

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Unless the connection closes or a pipelined request already started, the next request is awaited.
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._lingering:
            self.refused.lingering -= 1
            self._lingering = False
        super().connection_lost(exc)

    def _await_request(self) -> None:
        self._cancel_timer()
        self._awaited_after, self._partial = self.cycle, False
        self._timer = self.loop.call_later(self.limits.read_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._partial:  # a connection that sent nothing is just closed, like an idle keep-alive one
            message = (
                f"The request headers did not arrive within {self.limits.read_timeout:g} s (--read-timeout); "
                "send each request without pauses."
            )
            self.transport.write(_response(408, message))
        self.transport.close()


def _response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response with a JSON ``{"error": ...}`` body that closes the connection."""
    body = json.dumps({"error": message}).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body
