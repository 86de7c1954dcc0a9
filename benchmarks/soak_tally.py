"""The soak test's counters: statuses, refusals and errors, tallied from every thread (benchmarks/soak.py)."""

from __future__ import annotations

import collections
import json
import socket
import threading
from typing import Any

import httpx

MODEL = "shadow-backbone"
INFER = f"/v2/models/{MODEL}/infer"
STATS = f"/v2/models/{MODEL}/stats"
MODES = ("coupled", "speculative", "auto")
HANG_S = 60.0  # a generation (or a raw request's answer) taking longer than this is a hang
RSS_PERIOD_S = 0.2
TOKEN_CAP = 512  # --max-tokens-per-request passed to the server
MAX_CONCURRENT, MAX_QUEUED = 2, 2  # --max-concurrent and --max-queued passed to the server
BURST = MAX_CONCURRENT + MAX_QUEUED + 4  # slow requests sent at once by the burst kind: 4 or more get 503


# ----------------------------------------------------------------------------------------------- tally


class Tally:
    """Thread-safe counters of everything the soak observes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.good_status: collections.Counter[str] = collections.Counter()
        self.bad_status: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.counts: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, list[str]] = collections.defaultdict(list)  # a few examples per problem

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def note(self, problem: str, example: str) -> None:
        with self.lock:
            if len(self.samples[problem]) < 5:
                self.samples[problem].append(example[:300])

    def response(self, kind: str | None, status: int, headers: Any, body: bytes) -> None:
        """Counts a response (``kind`` None: a good session's) and checks a refusal's body and 5xx."""
        with self.lock:
            (self.good_status if kind is None else self.bad_status[kind])[str(status)] += 1
        where = kind or "good"
        if status >= 500:
            if status == 503 and headers.get("retry-after"):
                self.add("5xx_503_retry_after")
            elif status == 503:
                self.add("5xx_503_connections")
            else:
                self.add("5xx_unexpected")
                self.note("5xx_unexpected", f"{where}: {status} {body[:200]!r}")
        if status >= 400:
            if not _json_error(body):
                self.add("non_json_refusals")
                self.note("non_json_refusals", f"{where}: {status} {body[:200]!r}")


def _json_error(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), str) and bool(value["error"].strip())


class CountingTransport(httpx.HTTPTransport):
    """An httpx transport that tallies the status of every response a good session receives."""

    def __init__(self, tally: Tally) -> None:
        super().__init__(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.tally = tally

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code >= 400:
            response.read()
            self.tally.response(None, response.status_code, response.headers, response.content)
        else:
            with self.tally.lock:
                self.tally.good_status[str(response.status_code)] += 1
        return response
