"""Exceptions raised by ``shadowpeft.runtime``.

Each subclasses a builtin so that callers who do not know this package can still catch them
(``except ValueError``). Validators collect every problem first and raise once; the individual
problems stay available as ``error.problems`` for CLIs and tests.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BackboneMismatch",
    "ChatTemplateError",
    "DeviceProfileError",
    "ExportLoadError",
    "ManifestError",
    "ProtocolError",
    "Retryable",
    "RuntimeGenerationError",
    "ServerRejected",
    "ServerUnavailable",
    "SessionLost",
    "format_problems",
    "retry_after_seconds",
]


def format_problems(header: str, problems: Sequence[str]) -> str:
    """Builds the one message that lists every problem found by a validator.

    Args:
        header: First line: what was checked and how to fix it in general.
        problems: One line per problem, each naming the key, the value received and what is allowed.

    Returns:
        ``header`` followed by one ``  - problem`` line per problem (``header`` alone if there
        are none).
    """
    if not problems:
        return header
    return "\n".join([header, *(f"  - {problem}" for problem in problems)])


class ManifestError(ValueError):
    """An export directory's ``manifest.json`` is missing, unreadable, invalid or does not match its files.

    Attributes:
        problems: Every individual problem found, in the order found (empty for single-cause errors
            such as a missing file).
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


class DeviceProfileError(ValueError):
    """A device profile (``devices/<name>.toml``) is unknown, unreadable or invalid.

    Attributes:
        problems: Every individual problem found, in the order found (empty for single-cause errors
            such as an unknown profile name).
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)


class ChatTemplateError(ValueError):
    """An export's chat template is refused: too long, not valid Jinja, loads other templates, or passed a
    rendering limit (loop steps, range size, output size, time); the message names the limit and the fix."""


class ExportLoadError(ValueError):
    """An export directory cannot be opened: a graph onnxruntime refuses, or a missing tokenizer."""


class RuntimeGenerationError(RuntimeError):
    """Generation cannot go on (e.g. coupled mode lost its server); the message says what to do."""


class BackboneMismatch(RuntimeGenerationError):
    """The backbone server runs another backbone than the device export was made with (another checkpoint,
    base model or export run); the message names what differs and what to serve instead."""


class ServerUnavailable(ConnectionError):
    """The backbone server did not answer (refused, timed out, or failed) after the client's retries."""


class SessionLost(RuntimeError):
    """The server no longer holds this sequence (evicted, expired or restarted): re-prefill with sequence_start."""


class ServerRejected(RuntimeError):
    """The server refused a request with a 4xx status; the message is the server's.

    The backbone server raises it too, for requests it refuses; ``status`` is then the HTTP status it sends,
    and ``retry_after`` (for a refusal that may succeed later: a full KV budget, a busy server) its
    ``Retry-After`` header.

    Attributes:
        status: The HTTP status (``None`` when unknown).
        retry_after: Seconds after which the same request may succeed (``None``: retrying will not help).
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ProtocolError(ValueError):
    """A KServe v2 (Open Inference Protocol) request or response is malformed: bad JSON, an unknown
    datatype, a shape that does not match the data, or binary sizes that do not add up."""


class Retryable(ConnectionError):
    """One attempt of a client request failed in a way a retry may fix: no connection, a timeout, or a
    server that is busy or restarting (HTTP 502/503/504, gRPC UNAVAILABLE or DEADLINE_EXCEEDED). Raised by
    the client's wires (runtime/wire_http.py, wire_grpc.py) and caught by ``BackboneClient``'s retries,
    which raise :class:`ServerUnavailable` with this message when none is left.

    Attributes:
        retry_after: Seconds the server asked the client to wait before retrying (its ``Retry-After``; 0:
            it asked nothing, the client's backoff applies).
    """

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: The longest ``Retry-After`` a client honours, so that a misconfigured server cannot park it.
MAX_RETRY_AFTER_S = 30.0


def retry_after_seconds(value: str | bytes | None) -> float:
    """Seconds a ``Retry-After`` value asks for: a whole number of seconds, at most :data:`MAX_RETRY_AFTER_S`;
    0 for anything else (absent, an HTTP date, garbage)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = (value or "").strip()
    return min(float(text), MAX_RETRY_AFTER_S) if text.isascii() and text.isdigit() else 0.0
