"""Where a split decode step spends its time: ``time.perf_counter`` around each stage, by wrapping.

:func:`instrumented` wraps the callables a coupled step passes through, in one process that runs
both sides (the device runtime and shadow-serve in a thread), and restores them on exit. Raw
timers may nest; :func:`stages` turns their totals into disjoint stages that add up to the wall
time of the step::

    device  shadow graph ─ device/shadow session.run                                 (compute)
            BackboneClient.step ─ encode_request ─ httpx request ─ decode_response
                                                    │
    server                                          └─ ASGI app (infer route only)
                 read_body ─ decode_request ─ _validate ─ run_in_threadpool ─ encode_response
                                                            └─ BackboneRunner.run
                                                                 └─ cloud/backbone session.run  (compute)
    device  head graph ─ device/head session.run                                     (compute)

``http transport`` is the httpx request minus the app's time (httpx, h11, the loopback socket,
uvicorn's parsing and the hand-off to and from its event-loop thread); ``server other`` is the app
minus its wrapped parts (middleware, routing, the request gate, the session table); ``device other``
is the wall minus everything the device side waited for (feeds, the sampler, the client's Python).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

#: Disjoint stages in table order: (id, label, compute?).
STAGES: tuple[tuple[str, str, bool], ...] = (
    ("device_shadow_graph", "device/shadow session run", True),
    ("device_head_graph", "device/head session run", True),
    ("backbone_graph", "cloud/backbone session run (server)", True),
    ("request_encoding", "client: tensors -> KServe v2 request (binary body or protobuf)", False),
    ("response_decoding", "client: KServe v2 response -> tensors", False),
    (
        "http_transport",
        "round trip minus the server's share (HTTP: httpx, h11, uvicorn; gRPC: grpcio, HTTP/2; loopback, hand-offs)",
        False,
    ),
    ("server_read_body", "server: read_body", False),
    ("server_parse", "server: decode_request (parse + checks; gRPC: decode_infer_request)", False),
    ("server_validation", "server: request validation (_validate)", False),
    ("server_thread_hop", "server: run_in_threadpool hand-off, both ways", False),
    ("server_runner_python", "server: BackboneRunner feeds and copies around the session run", False),
    ("response_encoding", "server: tensors -> KServe v2 response", False),
    ("server_other", "server: middleware, routing, gate, session table, stats (gRPC: servicer)", False),
    ("device_other", "device: feeds, sampler, link and client Python", False),
)


#: With shadow-serve in a process of its own only the device side is instrumented: the server's share is one stage.
PROCESS_STAGES: tuple[tuple[str, str, bool | None], ...] = (
    ("device_shadow_graph", "device/shadow session run", True),
    ("device_head_graph", "device/head session run", True),
    ("request_encoding", "client: tensors -> KServe v2 request (binary body or protobuf)", False),
    ("response_decoding", "client: KServe v2 response -> tensors", False),
    ("server_round_trip", "request to the shadow-serve process (transport, server, backbone session)", None),
    ("device_other", "device: feeds, sampler, link and client Python", False),
)


class StageClock:
    """Totals of raw timers (seconds and calls), safe to add to from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)

    def timed(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` with every call's duration added to ``name``."""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return wrapper

    def timed_async(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        """The coroutine function ``func`` with every await's duration added to ``name``."""

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return wrapper

    def thread_hop(self, run_in_threadpool: Callable[..., Any]) -> Callable[..., Any]:
        """``run_in_threadpool`` timing the hand-off: from the await to the worker's start, and from its end back."""

        async def wrapper(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            marks: dict[str, float] = {}

            def inner(*a: Any, **k: Any) -> Any:
                marks["start"] = time.perf_counter()
                try:
                    return func(*a, **k)
                finally:
                    marks["end"] = time.perf_counter()

            called = time.perf_counter()
            try:
                return await run_in_threadpool(inner, *args, **kwargs)
            finally:
                if "end" in marks:
                    self.add("hop", (marks["start"] - called) + (time.perf_counter() - marks["end"]))

        return wrapper


class TimedApp:
    """ASGI wrapper timing the app's handling of each ``POST .../infer`` (the server's whole share)."""

    def __init__(self, app: Any, clock: StageClock) -> None:
        self.app, self.clock = app, clock
        self.state = app.state  # runtime.server.serve reads the service (and leaves the gRPC port) there

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.clock.add("app", time.perf_counter() - start)


@contextlib.contextmanager
def instrumented(clock: StageClock, *, export: Any, app: Any | None, client: Any) -> Iterator[None]:
    """Wraps the stages of a split step (see the module docstring) for the duration of the block.

    Args:
        clock: Where the raw timers add up.
        export: The opened export both sides use (its sessions are wrapped per instance).
        app: shadow-serve's app (``create_app``) in this process, its service's validation and runner wrapped;
            ``None`` when the server runs in another process (the device side only).
        client: The :class:`~shadowpeft.runtime.client.BackboneClient`, over HTTP or gRPC.
    """
    from shadowpeft.runtime import backbone_service, grpc_server, server, wire_grpc, wire_http
    from shadowpeft.runtime.contract import DEVICE_HEAD, DEVICE_SHADOW

    patches: list[tuple[Any, str, Any]] = [
        (export.session(DEVICE_SHADOW), "run", clock.timed("shadow", export.session(DEVICE_SHADOW).run)),
        (export.session(DEVICE_HEAD), "run", clock.timed("head", export.session(DEVICE_HEAD).run)),
    ]
    wire = client._wire
    if isinstance(wire, wire_http.HttpWire):
        patches += [
            (wire_http, "encode_request", clock.timed("encode", wire_http.encode_request)),
            (wire_http, "decode_response", clock.timed("decode", wire_http.decode_response)),
            (wire._http, "request", clock.timed("http", wire._http.request)),
        ]
    else:  # gRPC: the stub call is the round trip
        patches += [
            (wire_grpc, "encode_infer_request", clock.timed("encode", wire_grpc.encode_infer_request)),
            (wire_grpc, "decode_infer_response", clock.timed("decode", wire_grpc.decode_infer_response)),
            (wire, "_call", clock.timed("http", wire._call)),
        ]
    if app is not None:
        service = app.state.backbone
        patches += [
            (service.runner.session, "run", clock.timed("graph", service.runner.session.run)),
            (service.runner, "run", clock.timed("runner", service.runner.run)),
            (service, "_validate", clock.timed("validate", service._validate)),
            (server, "read_body", clock.timed_async("read_body", server.read_body)),
            (server, "decode_request", clock.timed("parse", server.decode_request)),
            (server, "encode_response", clock.timed("response_encode", server.encode_response)),
            (grpc_server, "decode_infer_request", clock.timed("parse", grpc_server.decode_infer_request)),
            (grpc_server, "encode_infer_response", clock.timed("response_encode", grpc_server.encode_infer_response)),
            (backbone_service, "run_in_threadpool", clock.thread_hop(backbone_service.run_in_threadpool)),
        ]
    with _patched(patches):
        yield


@contextlib.contextmanager
def grpc_servicer_timed(clock: StageClock) -> Iterator[None]:
    """Times the gRPC servicer's ModelInfer as the server's share (``app``, as :class:`TimedApp` for HTTP).

    Enter it before the gRPC server starts: the server takes the servicer's methods when it starts.
    """
    from shadowpeft.runtime import grpc_server

    servicer = grpc_server._Servicer
    with _patched([(servicer, "ModelInfer", clock.timed_async("app", servicer.ModelInfer))]):
        yield


@contextlib.contextmanager
def _patched(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """Sets each ``(target, name, value)`` for the block and restores what was there."""
    saved = [(target, name, target.__dict__.get(name, _ABSENT)) for target, name, _ in patches]
    try:
        for target, name, wrapper in patches:
            setattr(target, name, wrapper)
        yield
    finally:
        for target, name, before in reversed(saved):
            if before is _ABSENT:
                delattr(target, name)
            else:
                setattr(target, name, before)


_ABSENT = object()


def stages(raw: dict[str, float], wall: float, *, in_process: bool = True) -> dict[str, float]:
    """Disjoint stages (seconds, :data:`STAGES` ids; :data:`PROCESS_STAGES` ids when the server ran in another
    process) from raw timer totals over the same span as ``wall``."""
    get = lambda name: raw.get(name, 0.0)  # noqa: E731
    device_waits = ("shadow", "head", "encode", "decode", "http")
    if not in_process:
        ids = (
            "device_shadow_graph",
            "device_head_graph",
            "request_encoding",
            "response_decoding",
            "server_round_trip",
        )
        return {
            **dict(zip(ids, map(get, device_waits), strict=True)),
            "device_other": wall - sum(map(get, device_waits)),
        }
    server_parts = ("read_body", "parse", "validate", "hop", "runner", "response_encode")
    out = {
        "device_shadow_graph": get("shadow"),
        "device_head_graph": get("head"),
        "backbone_graph": get("graph"),
        "request_encoding": get("encode"),
        "response_decoding": get("decode"),
        "http_transport": get("http") - get("app"),
        "server_read_body": get("read_body"),
        "server_parse": get("parse"),
        "server_validation": get("validate"),
        "server_thread_hop": get("hop"),
        "server_runner_python": get("runner") - get("graph"),
        "response_encoding": get("response_encode"),
        "server_other": get("app") - sum(get(name) for name in server_parts),
    }
    out["device_other"] = wall - sum(get(name) for name in device_waits)
    return out
