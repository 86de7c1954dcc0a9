"""What the backbone server lets in, before any graph runs: request sizes and concurrent requests.

Every limit bounds memory, so that the server's peak is known in advance::

    body     <= max_body_bytes       (default: max_tokens per request at fp32 + a JSON header)
    JSON     <= max_json_bytes       (a JSON body, or the JSON header of a binary one; parsing JSON
                                      costs ~14x its bytes, binary tensors ~1x)
    T        <= max_tokens           (tokens per request: bounds attention, quadratic in T)
    in flight <= max_concurrent      (requests read, parsed and computed at once; up to max_queued
                                      more wait, the rest get 503 + Retry-After)

    peak ~ max_concurrent x (body + parsed tensors + one step's activations) + the KV budget
           (held caches, see :class:`~shadowpeft.runtime.sessions.SessionLimits`); the process's RSS is held
           under ``--memory-budget`` by :mod:`~shadowpeft.runtime.memory`

Sizes are checked against ``Content-Length`` and ``Inference-Header-Content-Length`` before the
body is read, and while it streams when there is no ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import ClientDisconnect, Request

from shadowpeft.runtime.errors import ServerRejected
from shadowpeft.runtime.memory import MemoryGuard

__all__ = ["RequestGate", "RequestLimits", "body_bytes_for", "parse_size", "read_body"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "t": 10**12, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_ID_BYTES = 8  # an INT64 token id
_STATE_BYTES = 4  # one FP32 shadow-state value (FP16 sends half)
_BUSY_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits of the backbone server.

    Attributes:
        max_tokens: Tokens one request may carry (a longer prompt is sent in chunks, as
            :class:`~shadowpeft.runtime.client.BackboneClient` does with ``max_chunk_tokens``).
        max_body_bytes: Largest body; ``None``: :func:`body_bytes_for` ``max_tokens``.
        max_json_bytes: Largest JSON body, or JSON header of a binary-tensor body.
        max_concurrent: Infer requests read, parsed and computed at once.
        max_queued: Infer requests waiting for one of those places; more are refused (503).
    """

    max_tokens: int = 512
    max_body_bytes: int | None = None
    max_json_bytes: int = 1 << 20
    max_concurrent: int = 4
    max_queued: int = 64

    def __post_init__(self) -> None:
        sizes = (self.max_tokens, self.max_json_bytes, self.max_concurrent, self.max_body_bytes or 1)
        if min(sizes) < 1 or self.max_queued < 0:
            raise ValueError(f"Request limits must be positive (max_queued >= 0); got {self}.")


def body_bytes_for(tokens: int, hidden_size: int, json_bytes: int) -> int:
    """The largest binary-tensor body a request of ``tokens`` tokens needs: ids (INT64) and shadow
    states (FP32, the wider wire type) of width ``hidden_size``, after a JSON header of ``json_bytes``."""
    return json_bytes + tokens * (_ID_BYTES + _STATE_BYTES * hidden_size)


def parse_size(text: str) -> int:
    """Bytes from a size like ``1073741824``, ``1GiB``, ``512 MiB`` or ``2GB`` (KiB = 1024, KB = 1000).

    Raises:
        ValueError: For anything else, naming the accepted forms.
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"Cannot read {text!r} as a size; use bytes or a number with a unit, e.g. 1073741824, 1GiB, 512MiB, "
            "2GB (KiB/MiB/GiB: powers of 1024; KB/MB/GB: powers of 1000)."
        )
    return int(float(match.group(1)) * _UNITS[unit])


class RequestGate:
    """At most ``slots`` requests inside at once, at most ``queue`` more waiting; the rest refused (503).

    Used from the server's event loop only.

    Args:
        slots: Requests inside at once.
        queue: Requests waiting for a place.
        memory: Checks, once a request has its place, that the process has room for it (503 otherwise).
    """

    def __init__(self, slots: int, queue: int, *, memory: MemoryGuard | None = None) -> None:
        self.slots, self.queue, self.memory = slots, queue, memory
        self.inside = self.waiting = 0
        self.refused = 0
        self._free = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def enter(self) -> AsyncIterator[None]:
        """Holds a place for the body of the ``async with``.

        Raises:
            ServerRejected: 503 with ``retry_after`` when every place is taken and the queue is full.
        """
        if self.inside >= self.slots and self.waiting >= self.queue:
            self.refused += 1
            raise ServerRejected(
                f"The server is busy: {self.inside} requests are being processed (--max-concurrent {self.slots}) "
                f"and {self.waiting} wait (--max-queued {self.queue}). Retry shortly.",
                status=503,
                retry_after=_BUSY_RETRY_AFTER_S,
            )
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.inside += 1
        try:
            if self.memory is not None:
                self.memory.admit(self.inside)
            yield
        finally:
            self.inside -= 1
            self._free.release()
            if self.memory is not None:
                self.memory.released()


async def read_body(request: Request, limit: int, option: str, hint: str) -> bytes:
    """The body, refused with 413 beyond ``limit`` bytes (before reading when Content-Length says so).

    Args:
        request: The request.
        limit: Largest body accepted.
        option: The option that sets ``limit``, for the message (e.g. ``--max-body-bytes``).
        hint: What the client should do instead, for the message.
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise ServerRejected(
            f"Content-Encoding {encoding!r} is not supported; send the body uncompressed.", status=415
        )
    declared = request.headers.get("content-length")
    too_large = f"The request body is larger than this server's limit of {limit} bytes ({option})"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServerRejected(f"{too_large}: Content-Length {declared}. {hint}", status=413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServerRejected(f"{too_large}. {hint}", status=413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServerRejected("The client disconnected before sending the whole body.", status=400) from None
    return b"".join(chunks)
