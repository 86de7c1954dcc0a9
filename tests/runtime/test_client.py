"""BackboneClient against a server that stops answering: deadlines bound the waits, whatever the retries.

Auto mode waits at most its timeout per step in total (retries included) before it uses the
shadow's token; a step with a deadline makes no attempt the deadline leaves no time for; ending a
sequence is one attempt, and none after the link found the server gone, so coupled mode stops
within its step's retries. The upper bounds on time are generous (a loaded 2-core machine); the
request counts are what a retry would change.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from shadowpeft.runtime.client import BackboneClient
from shadowpeft.runtime.errors import RuntimeGenerationError, ServerUnavailable
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import GenerationResult, Generator
from shadowpeft.runtime.sampling import SamplingConfig
from shadowpeft.runtime.server import ServerConfig, create_app, serving_options
from shadowpeft.runtime.step import DeviceShadow
from tests.runtime.conftest import serve_in_thread
from tests.runtime.test_generate import COUPLED_CLOUD, GREEDY, PROMPTS

TOKEN = "client-test-token-0123456789"
TIMEOUT = 0.5


class Hanging:
    """An ASGI app in front of shadow-serve's: a request for which ``hangs(scope)`` is true gets no answer
    until ``released`` is set (then a 503, to a client long gone); ``hung`` counts them."""

    def __init__(self, app, hangs: Callable[[dict], bool]) -> None:
        self.app, self.hangs = app, hangs
        self.released = threading.Event()
        self.hung = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.hangs(scope):
            await self.app(scope, receive, send)
            return
        self.hung += 1
        while not self.released.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@contextlib.contextmanager
def hanging_server(export, hangs: Callable[[dict], bool]) -> Iterator[tuple[Hanging, str]]:
    front = Hanging(create_app(export, ServerConfig(TOKEN)), hangs)
    with serve_in_thread(front, options=serving_options(front.app)) as url:  # the served app's limits
        try:
            yield front, url
        finally:
            front.released.set()  # before the server stops: it waits for its requests to finish


@pytest.fixture(scope="module")
def export(toy_export):
    return open_export(toy_export.export, threads=1)


def client_for(url: str, **options) -> BackboneClient:
    options = {"timeout": TIMEOUT, "retries": 5, "backoff": 0.0, **options}
    return BackboneClient(url, token=TOKEN, dtype="float32", **options)


def is_inference(scope: dict) -> bool:
    return scope["method"] == "POST"


@pytest.mark.parametrize("hangs", [is_inference, lambda scope: True], ids=["inference", "everything"])
def test_auto_waits_at_most_its_timeout_per_step_whatever_the_retries(export, hangs) -> None:
    with hanging_server(export, hangs) as (front, url):
        client = client_for(url)  # 5 retries: their own budget would be 6 x TIMEOUT
        generator = Generator(export, mode="auto", client=client, escalation=COUPLED_CLOUD, retry_interval_s=60.0)
        result = GenerationResult(PROMPTS[0])
        stream = generator.stream(PROMPTS[0], SamplingConfig(max_new_tokens=3), result)
        began = time.monotonic()
        first = next(stream)
        waited = time.monotonic() - began
        rest = list(stream)
    assert first.mode == "detached" and [e.mode for e in rest] == ["detached"] * 2
    assert front.hung == 1, "a retry was made after the step's deadline"  # handshake or first step, not both
    assert waited < TIMEOUT * 1.5 + 1.0
    assert result.fallbacks == 1 and "within its deadline (5 retries left unused)" in result.fallback_reason


def test_a_steps_deadline_caps_each_attempts_timeout(export) -> None:
    ids = np.asarray([PROMPTS[0]], dtype=np.int64)
    _, s0 = DeviceShadow(export, 1).step(ids)
    with hanging_server(export, is_inference) as (front, url):
        client = client_for(url, timeout=30.0)
        began = time.monotonic()
        with pytest.raises(ServerUnavailable, match="after 1 attempt"):
            client.step(client.new_sequence_id(), ids, s0, start=True, deadline=time.monotonic() + TIMEOUT)
        waited = time.monotonic() - began
    assert front.hung == 1 and waited < TIMEOUT * 1.5 + 1.0


def test_ending_a_sequence_is_one_attempt(export) -> None:
    ids = np.asarray([PROMPTS[0]], dtype=np.int64)
    _, s0 = DeviceShadow(export, 1).step(ids)
    dead = threading.Event()
    with hanging_server(export, lambda scope: dead.is_set()) as (front, url):
        client = client_for(url)
        sequence_id = client.new_sequence_id()
        client.step(sequence_id, ids, s0, start=True)
        dead.set()
        with pytest.raises(ServerUnavailable, match="after 1 attempt"):
            client.end(sequence_id)
    assert front.hung == 1


def test_coupled_stops_within_its_steps_retries_and_does_not_end_on_a_dead_server(export) -> None:
    dead = threading.Event()
    with hanging_server(export, lambda scope: dead.is_set()) as (front, url):
        client = client_for(url, retries=2)
        stream = Generator(export, mode="coupled", client=client).stream(PROMPTS[0], GREEDY)
        next(stream)
        dead.set()
        began = time.monotonic()
        with pytest.raises(RuntimeGenerationError, match="lost the backbone server"):
            next(stream)
        waited = time.monotonic() - began
    assert front.hung == 3, "the step's attempt and its 2 retries, then no sequence_end (the server is gone)"
    assert waited < 3 * TIMEOUT * 1.5 + 1.0
