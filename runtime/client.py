"""Client of the backbone server (``shadow-serve``): one coupled-mode step per call, over KServe v2 HTTP
(``http://``, runtime/wire_http.py) or gRPC (``grpc://``, runtime/wire_grpc.py), with the same retries.

Each :meth:`BackboneClient.step` sends a sequence's new token ids and their shadow states ``s0``
and returns the backbone's final hidden states; the server keeps the base KV cache. Long inputs
(a prompt) are split into chunks of ``max_chunk_tokens``; only the first carries
``sequence_start``. Tensors travel as binary data both ways, in ``dtype`` (float16 halves the
bytes). Every request carries ``sequence_offset`` (the tokens this client has sent for the
sequence) so that a retried step is never appended twice: the server answers a repeat of its last
step again, rolls the sequence back to a smaller offset (:meth:`BackboneClient.rewind` sets it, for
draft tokens the device rejected), and reports an offset beyond what it holds as a lost session.

Before the first step, :meth:`BackboneClient.verify_backbone` compares the backbone the server
publishes in its model metadata (fetched once per client) with the device export's manifest
(runtime/handshake.py). A step may carry a ``deadline`` (``time.monotonic()`` seconds): its
requests and retries then stop when it passes, whatever ``retries`` allows (auto mode waits at most
its timeout per step). :meth:`BackboneClient.end` is best effort: one attempt, no retry.

Errors (``shadowpeft.runtime.errors``): :class:`ServerUnavailable` when the server does not answer
after ``retries`` retries with exponential backoff (or answers 5xx), :class:`SessionLost` when it
no longer holds the sequence (evicted, expired, restarted: re-send the whole history with
``start=True``), :class:`ServerRejected` for any other 4xx, with the server's message.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx
import numpy as np

from shadowpeft.runtime.contract import (
    HIDDEN_STATES,
    INPUT_IDS,
    MODEL_NAME,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_OFFSET,
    SEQUENCE_START,
    SHADOW_STATES,
    WIRE_DTYPES,
)
from shadowpeft.runtime.errors import BackboneMismatch, Retryable, ServerRejected, ServerUnavailable, SessionLost
from shadowpeft.runtime.handshake import BackboneCheck, check_backbone
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.wire_grpc import GRPC_SCHEMES, GrpcWire
from shadowpeft.runtime.wire_http import HttpWire

__all__ = ["BackboneClient", "new_sequence_id"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MAX_BACKOFF = 5.0
_MAX_TRACKED = 4096
_MIN_ATTEMPT = 0.05  # seconds: with less time left before a deadline, no attempt is started (none could be answered)


def new_sequence_id() -> int:
    """A random sequence id in [1, 2**63): unguessable enough that clients sharing a token do not collide."""
    return secrets.randbelow(2**63 - 1) + 1


class BackboneClient:
    """Talks to one ``shadow-serve`` (or any server of the same model over KServe v2 HTTP or gRPC).

    Args:
        url: Server base URL: ``http://127.0.0.1:8000`` (HTTP, runtime/wire_http.py) or ``grpc://127.0.0.1:8001``
            (gRPC, ``shadow-serve --grpc-port``; ``grpcs://`` with TLS; runtime/wire_grpc.py). Both wires have the
            same retries, timeouts, deadlines and errors.
        token: Bearer token (``--token`` of the server), or ``None`` for a server run with ``--no-auth``.
        timeout: Seconds to wait for a connection and for each response (a step with a deadline waits no longer
            than the deadline allows).
        retries: Retries after a connection failure, a timeout or a 502/503/504 (0: try once); a step with a
            deadline stops retrying when it passes.
        backoff: Seconds before the first retry; doubled each time (with up to 10% jitter).
        dtype: Wire type of ``shadow_states`` and ``hidden_states``: ``"float16"`` or ``"float32"``.
        max_chunk_tokens: Most tokens per request; longer steps are split.
        model_name: The model's name on the server.
        transport: An httpx transport (tests; HTTP only).

    Attributes:
        bytes_sent: Bytes of every request sent (HTTP: request line, headers and body, as HTTP/1.1 frames them;
            gRPC: the protobuf messages).
        bytes_received: Bytes of every response received (HTTP: status line, headers, body; gRPC: the messages).
        requests: Requests made, retries included.
        timeout: The ``timeout`` given.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.1,
        dtype: Literal["float16", "float32"] = "float16",
        max_chunk_tokens: int = 256,
        model_name: str = MODEL_NAME,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://", *GRPC_SCHEMES)):
            raise ValueError(
                f"url must start with http:// or https:// (KServe v2 over HTTP), or grpc:// or grpcs:// (over gRPC, "
                f"shadow-serve --grpc-port); got {url!r}."
            )
        if transport is not None and url.startswith(GRPC_SCHEMES):
            raise ValueError("transport= is an httpx transport, for http:// and https:// URLs only.")
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, WIRE_DTYPES))}; got {dtype!r}.")
        if max_chunk_tokens < 1 or retries < 0 or not timeout > 0 or backoff < 0:
            raise ValueError(
                "max_chunk_tokens must be >= 1, retries >= 0, timeout > 0 and backoff >= 0; got "
                f"{max_chunk_tokens}, {retries}, {timeout}, {backoff}."
            )
        self.url, self.dtype, self.model_name, self.timeout = url.rstrip("/"), np.dtype(dtype), model_name, timeout
        self.retries, self.backoff, self.max_chunk_tokens = retries, backoff, max_chunk_tokens
        self._wire: HttpWire | GrpcWire
        if url.startswith(GRPC_SCHEMES):
            self._wire = GrpcWire(self.url, token=token, count=self._count)
        else:
            self._wire = HttpWire(self.url, token=token, timeout=timeout, transport=transport, count=self._count)
        self._offsets: dict[int | str, int] = {}  # tokens the server holds per sequence, as far as we know
        self._lock = threading.Lock()  # guards the counters and _offsets (steps may run on many threads)
        self._d: int | None = None  # hidden size, from the first step (or the metadata)
        self._metadata: dict[str, Any] | None = None  # the model metadata, fetched once
        self._warned_unverified = False
        self.bytes_sent = self.bytes_received = self.requests = 0

    new_sequence_id = staticmethod(new_sequence_id)

    def step(
        self,
        sequence_id: int | str,
        input_ids: np.ndarray,
        shadow_states: np.ndarray,
        *,
        start: bool,
        deadline: float | None = None,
    ) -> np.ndarray:
        """Sends T new tokens of a sequence; returns their final hidden states.

        Args:
            sequence_id: The sequence (see :func:`new_sequence_id`).
            input_ids: (1, T) token ids.
            shadow_states: (1, T, d) shadow states ``s0`` of those tokens.
            start: Begin (or restart) the sequence with these tokens: a prompt, or a re-prefill of
                the whole history after :class:`SessionLost`.
            deadline: ``time.monotonic()`` by which the whole step (every chunk and retry) must be answered;
                ``None``: each request waits ``timeout`` and retries ``retries`` times.

        Returns:
            (1, T, d) float32 hidden states (final-normed; ``device/head`` turns them into logits).

        Raises:
            ValueError: For inputs of the wrong shape.
            ServerUnavailable: No answer after the retries (or by the deadline), or a 5xx.
            SessionLost: The server no longer holds the sequence; re-send its history with ``start=True``.
            ServerRejected: Any other 4xx, with the server's message.
        """
        ids, s0 = _check_step(input_ids, shadow_states)
        self._d = s0.shape[2]
        with self._lock:
            before = 0 if start else self._offsets.get(sequence_id)
        offset, parts = before, []
        size = self._chunk_tokens(ids.shape[1], deadline)
        try:
            for begin in range(0, ids.shape[1], size):
                chunk = slice(begin, begin + size)
                first = start and begin == 0
                parts.append(self._infer(sequence_id, ids[:, chunk], s0[:, chunk], first, offset, deadline=deadline))
                offset = None if offset is None else offset + parts[-1].shape[1]
        except BaseException:
            with self._lock:  # a retry of this step from its start is recognised by the server
                self._forget_or_set(sequence_id, before)
            raise
        with self._lock:
            self._forget_or_set(sequence_id, offset)
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def rewind(self, sequence_id: int | str, length: int) -> None:
        """Makes the next step of ``sequence_id`` continue after its first ``length`` tokens.

        Nothing is sent now: the next :meth:`step` carries ``sequence_offset = length``, and the server
        drops the tokens it holds after that offset before appending (a rollback of rejected drafts).

        Raises:
            ValueError: For a ``length`` < 0 or beyond the tokens sent for the sequence.
        """
        with self._lock:
            held = self._offsets.get(sequence_id)
            if not isinstance(length, int) or length < 0 or (held is not None and length > held):
                raise ValueError(f"rewind(length) takes 0 <= length <= {held} (the tokens sent); got {length!r}.")
            self._forget_or_set(sequence_id, length)

    def end(self, sequence_id: int | str, *, timeout: float | None = None, retries: int = 0) -> None:
        """Ends a sequence (``sequence_end``), freeing its cache; a sequence the server lost is ignored.

        Best effort: one attempt, no retry, so that a dead server does not delay the caller's exit (the
        server's idle TTL frees a sequence whose end never arrived).

        Args:
            sequence_id: The sequence.
            timeout: Seconds to wait for the answer (default: the client's ``timeout``).
            retries: Retries (default 0: one attempt).

        Raises:
            ServerUnavailable, ServerRejected: As :meth:`step`.
        """
        with self._lock:
            offset = self._offsets.pop(sequence_id, None)
        empty_ids = np.zeros((1, 0), dtype=np.int64)
        try:
            self._infer(sequence_id, empty_ids, None, False, offset, end=True, retries=retries, timeout=timeout)
        except SessionLost:
            logger.debug("sequence %r was already gone when ended", sequence_id)

    def ready(self) -> bool:
        """Whether the server is up and the model ready (``False`` when it cannot be reached).

        Raises:
            ServerRejected: The server refuses this client (e.g. a wrong token, 401).
        """
        try:
            return self._call("ready", lambda wait: self._wire.ready(self.model_name, timeout=wait), retries=0)
        except ServerUnavailable:
            return False

    def metadata(self, *, deadline: float | None = None) -> dict[str, Any]:
        """The model's metadata: inputs, outputs, and under ``shadowpeft`` the hidden size, limits and
        what identifies the backbone (see :meth:`verify_backbone`). Fetched once; later calls return that copy.

        Args:
            deadline: ``time.monotonic()`` by which the server must have answered (see :meth:`step`).
        """
        if self._metadata is None:
            fetch = lambda wait: self._wire.metadata(self.model_name, timeout=wait)  # noqa: E731
            self._metadata = self._call("metadata", fetch, deadline=deadline)
        return self._metadata

    def _chunk_tokens(self, tokens: int, deadline: float | None) -> int:
        """Tokens per request for a step of ``tokens``: ``max_chunk_tokens``, or less when the server takes
        fewer per request (its metadata's ``max_tokens_per_request``, fetched once, before the first step of
        more than one token)."""
        if tokens > 1 and self._metadata is None:
            try:
                self.metadata(deadline=deadline)
            except ServerRejected:  # a server without shadow-serve's metadata: its cap is unknown
                self._metadata = {}
        limits = (self._metadata or {}).get("shadowpeft")
        cap = limits.get("max_tokens_per_request") if isinstance(limits, dict) else None
        if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1:
            return min(self.max_chunk_tokens, cap)
        return self.max_chunk_tokens

    def verify_backbone(self, manifest: Manifest, *, deadline: float | None = None) -> BackboneCheck:
        """The handshake: checks that the server runs the backbone of the export ``manifest`` describes.

        Compares the server's published base fingerprint and ``cloud/backbone`` graph digests with the
        manifest's (runtime/handshake.py). The metadata is fetched once per client, so calling this before
        every sequence costs one request in all. A server that publishes nothing to compare (not
        shadow-serve) passes, with a warning logged once.

        Args:
            manifest: The device export's manifest.
            deadline: ``time.monotonic()`` by which the server must have answered (see :meth:`step`).

        Returns:
            What was compared.

        Raises:
            BackboneMismatch: The server runs another backbone; the message says what differs and what to do.
            ServerUnavailable, ServerRejected: As :meth:`step`.
        """
        check = check_backbone(manifest, self.metadata(deadline=deadline), url=self.url)
        if not check.matches:
            raise BackboneMismatch(check.mismatch())
        if not check.verified and not self._warned_unverified:
            self._warned_unverified = True
            logger.warning(
                "The server at %s publishes no backbone identity (base_fingerprint, graph_sha256) in its model "
                "metadata; cannot check that it serves this export's backbone. Serve it with shadow-serve to check.",
                self.url,
            )
        return check

    def stats(self) -> dict[str, Any]:
        """The model's statistics, with ``sequences.active`` (sessions held) and bytes in and out (over gRPC:
        the Triton ``model_stats`` only)."""
        return self._call("stats", lambda wait: self._wire.stats(self.model_name, timeout=wait))

    def close(self) -> None:
        """Closes the connections."""
        self._wire.close()

    def __enter__(self) -> BackboneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------------

    def _infer(
        self,
        sequence_id: int | str,
        ids: np.ndarray,
        s0: np.ndarray | None,
        start: bool,
        offset: int | None,
        *,
        end: bool = False,
        deadline: float | None = None,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """One request (with :meth:`_call`'s retries, deadline and timeout); returns (1, T, d) float32."""
        if s0 is None:  # an empty step (sequence_end only) still sends a well-formed (1, 0, d) tensor
            states = np.zeros((1, 0, self._hidden_size()), dtype=self.dtype)
        else:
            states = s0.astype(self.dtype)
        parameters: dict[str, Any] = {SEQUENCE_ID: sequence_id}
        parameters.update({key: True for key, flag in ((SEQUENCE_START, start), (SEQUENCE_END, end)) if flag})
        if offset is not None:
            parameters[SEQUENCE_OFFSET] = offset
        inputs = {INPUT_IDS: ids, SHADOW_STATES: states}
        send = lambda wait: self._wire.infer(self.model_name, parameters, inputs, timeout=wait)  # noqa: E731
        hidden = self._call("infer", send, deadline=deadline, retries=retries, timeout=timeout)
        if hidden.shape != states.shape or hidden.dtype != self.dtype:
            raise ServerUnavailable(
                f"{self.url} returned {HIDDEN_STATES} {hidden.dtype} {list(hidden.shape)}; expected {self.dtype} "
                f"{list(states.shape)}. The server serves a different model; check its export."
            )
        return hidden.astype(np.float32)

    def _hidden_size(self) -> int:
        if self._d is None:
            inputs = {spec["name"]: spec for spec in self.metadata()["inputs"]}
            self._d = int(inputs[SHADOW_STATES]["shape"][2])
        return self._d

    def _call(
        self,
        operation: str,
        attempt: Callable[[float], _T],
        *,
        retries: int | None = None,
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> _T:
        """Calls ``attempt(seconds)`` (one request on the wire) with retries, none that ``deadline`` leaves no
        time for; returns its result or raises its typed error. Each attempt waits ``timeout`` (default: the
        client's), and no later than ``deadline``; a :class:`Retryable` failure is retried."""
        attempts = (self.retries if retries is None else retries) + 1
        failure, made, asked = "no time left before the deadline", 0, 0.0
        for index in range(attempts):
            if index:
                delay = min(self.backoff * 2 ** (index - 1), _MAX_BACKOFF) * (1 + random.random() / 10)
                delay = max(delay, asked)  # a busy server's Retry-After: an earlier retry would be refused too
                if deadline is not None and time.monotonic() + delay + _MIN_ATTEMPT > deadline:
                    break
                time.sleep(delay)
            wait = self.timeout if timeout is None else timeout
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait < _MIN_ATTEMPT:
                    break
            made += 1
            try:
                return attempt(wait)
            except Retryable as err:
                failure, asked = str(err), err.retry_after
        within = f" within its deadline ({attempts - made} retries left unused)" if made < attempts else ""
        raise ServerUnavailable(
            f"The backbone server at {self.url} did not answer {self._wire.where(operation, self.model_name)} after "
            f"{made} attempt(s){within}: {failure}. Check that shadow-serve runs and is reachable, or run detached."
        )

    def _count(self, sent: int, received: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received
            self.requests += 1

    def _forget_or_set(self, sequence_id: int | str, offset: int | None) -> None:
        self._offsets.pop(sequence_id, None)
        if offset is not None:
            self._offsets[sequence_id] = offset
            while len(self._offsets) > _MAX_TRACKED:  # sequences abandoned without end(): forget the oldest
                self._offsets.pop(next(iter(self._offsets)))


def _check_step(input_ids: np.ndarray, shadow_states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, s0 = np.asarray(input_ids), np.asarray(shadow_states)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{INPUT_IDS} must be integer ids of shape (1, T) with T >= 1; got {ids.dtype} {ids.shape}.")
    if s0.ndim != 3 or s0.shape[:2] != ids.shape or not np.issubdtype(s0.dtype, np.floating):
        raise ValueError(
            f"{SHADOW_STATES} must be floats of shape (1, T, d) with T = {ids.shape[1]}; got {s0.dtype} {s0.shape}."
        )
    return ids.astype(np.int64, copy=False), s0
