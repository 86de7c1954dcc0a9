"""The backbone server: an export's ``cloud/backbone`` graph behind KServe v2 / Open Inference Protocol.

A Starlette app (served by uvicorn, see :func:`run_server`), the reference implementation of
coupled mode's cloud side. Per request a client sends, for one sequence (batch 1)::

    POST /v2/models/shadow-backbone/infer
      inputs:     input_ids INT64 [1, T], shadow_states FP32|FP16 [1, T, d]   (JSON or binary data)
      parameters: sequence_id (int > 0 or string), sequence_start, sequence_end (bools),
                  sequence_offset (optional: tokens the client believes the server holds)
    <- hidden_states [1, T, d] in the dtype of the request's shadow_states (the fp16/fp32 negotiation)

A ``sequence_offset`` below the tokens held rolls the sequence back first: the server drops the
tokens after it (draft tokens the device rejected in speculative mode), then appends the new ones;
an exact repeat of the last step is answered again instead (an idempotent retry). An offset above
the tokens held is a 409.

The server keeps each sequence's base KV cache (:mod:`shadowpeft.runtime.sessions`) and computes
``attention_mask`` and ``position_ids`` itself. Memory is bounded before any graph runs: the body
size, the JSON size and the tokens per request (:mod:`shadowpeft.runtime.admission`), the requests
in flight, and the KV cache all sequences hold (a byte budget, :mod:`shadowpeft.runtime.sessions`).
A ``sequence_end`` without tokens ends the sequence whatever its ``sequence_offset``.

Status codes: 400 malformed or invalid request (JSON ``{"error": ...}`` naming the tensor), 401
missing or wrong bearer token, 403 (auth off) a Host or Origin that is not loopback, 404 unknown
model or route, 408 the body took longer than the read timeout, 409 unknown, evicted, expired or
out-of-sync sequence (re-prefill with ``sequence_start``), 413 body, JSON or tokens per request
over the limit (send fewer tokens per request), 415 compressed body or a Content-Type other than
JSON or binary, 503 with ``Retry-After``: the session slots or the KV budget are full of busy
sequences, or too many requests are in flight (nothing changed: retry); 503 without it: every
connection is taken (:mod:`shadowpeft.runtime.connections`), 500 the graph failed (the sequence's
cache is unchanged). Who may call, and how, is :mod:`shadowpeft.runtime.access`.

This module is the HTTP transport only: what a request does (validation, sessions, limits) is
:mod:`shadowpeft.runtime.backbone_service`, which the gRPC transport
(:mod:`shadowpeft.runtime.grpc_server`, ``shadow-serve --grpc-port``) shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shadowpeft.runtime.access import LOG_KEY as _LOG_KEY
from shadowpeft.runtime.access import AccessGate
from shadowpeft.runtime.admission import read_body
from shadowpeft.runtime.backbone_service import BackboneService, ServerConfig
from shadowpeft.runtime.connections import uvicorn_options
from shadowpeft.runtime.contract import HIDDEN_STATES, MODEL_NAME, MODEL_VERSION, SEQUENCE_LENGTH
from shadowpeft.runtime.errors import ProtocolError, ServerRejected, SessionLost
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.protocol import HEADER_LENGTH, decode_request, encode_response
from shadowpeft.runtime.protocol import parse_header_length as _header_length

__all__ = ["ServerConfig", "create_app", "run_server", "serve", "serving_options"]

logger = logging.getLogger(__name__)

_ROUTES = "GET /v2, /v2/health/live|ready, /v2/models/NAME[/versions/1][/ready|/stats|/config]; POST .../infer"
_INLINE_DECODE_BYTES = 64 << 10  # larger bodies are decoded in the thread pool
_JSON_COST = (
    "parsing JSON costs about 14x its size; send tensors as binary data (the binary tensor extension: "
    "BackboneClient does, tritonclient with binary_data=True) or fewer tokens per request"
)


class _HttpRoutes:
    """The HTTP routes of one app, over the :class:`BackboneService` that does the work."""

    def __init__(self, service: BackboneService) -> None:
        self.service = service

    # --- metadata and health ---------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(self.service.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse(self.service.model_metadata())

    async def model_configuration(self, request: Request) -> Response:
        """Triton's model-configuration extension (``tritonclient``'s ``get_model_config``)."""
        self._model(request)
        return JSONResponse(self.service.model_config())

    async def model_ready(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse({"name": MODEL_NAME, "ready": True})

    async def model_stats(self, request: Request) -> Response:
        """See :meth:`BackboneService.model_stats`."""
        self._model(request)
        return JSONResponse(self.service.model_stats())

    # --- inference ---------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self._model(request)
        service = self.service
        limit, option, hint = self._body_limit(request)  # 413 before reading, when the headers say so
        async with service.gate.enter():  # bounds the bodies, parsed tensors and steps held at once
            try:
                body = await read_body(request, limit, option, hint)
            except ServerRejected as err:
                if err.status == 413:
                    service.table.stats.refused["json_bytes" if "json" in option else "body_bytes"] += 1
                raise
            size = _header_length(request.headers.get(HEADER_LENGTH), len(body))
            if len(body) > _INLINE_DECODE_BYTES:  # parsing a large JSON body would stall every other session
                decoded = await run_in_threadpool(decode_request, body, size)
            else:
                decoded = decode_request(body, size)
            result = await service.run_step(decoded.inputs, decoded.parameters, decoded.outputs)
            binary = decoded.binary_outputs if decoded.outputs is None else decoded.outputs[HIDDEN_STATES]
            content, json_size = encode_response(
                {HIDDEN_STATES: result.hidden},
                model_name=MODEL_NAME,
                model_version=MODEL_VERSION,
                binary=binary,
                parameters={SEQUENCE_LENGTH: result.sequence_length},
                request_id=decoded.id,
            )
        service.record(result, bytes_in=len(body), bytes_out=len(content))
        request.scope[_LOG_KEY] = f"{result.summary} in={len(body)}B out={len(content)}B"
        headers = {HEADER_LENGTH: str(json_size)} if json_size is not None else {}
        media = "application/octet-stream" if json_size is not None else "application/json"
        return Response(content, headers=headers, media_type=media)

    def _body_limit(self, request: Request) -> tuple[int, str, str]:
        """The body limit for ``request``, its option and the advice for a client over it; a JSON header
        over ``--max-json-bytes`` is refused (413) here, before the body is read."""
        service = self.service
        json_limit, tokens = service.config.requests.max_json_bytes, service.config.requests.max_tokens
        chunks = (
            f"Send at most {tokens} tokens per request (--max-tokens-per-request): split a longer prompt into "
            "chunks (BackboneClient(max_chunk_tokens=...))."
        )
        declared = request.headers.get(HEADER_LENGTH, "").strip()
        if HEADER_LENGTH not in request.headers:  # the whole body is JSON
            if json_limit < service.max_body_bytes:
                return json_limit, "--max-json-bytes", f"A body without {HEADER_LENGTH} is all JSON: {_JSON_COST}."
        # A malformed value (not 1-20 ASCII digits: '²' passes isdigit() and int() refuses 5,000 digits) falls
        # through to parse_header_length's 400.
        elif declared.isascii() and declared.isdigit() and len(declared) <= 20 and int(declared) > json_limit:
            service.table.stats.refused["json_bytes"] += 1
            raise ServerRejected(
                f"The JSON header of this request has {declared} bytes ({HEADER_LENGTH}); this server accepts at "
                f"most {json_limit} (--max-json-bytes): {_JSON_COST}.",
                status=413,
            )
        return service.max_body_bytes, "--max-body-bytes", chunks

    def _model(self, request: Request) -> None:
        self.service.check_model(request.path_params["name"], request.path_params.get("version"))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """Sweeps idle sessions in the background while the server runs."""
        task = asyncio.create_task(self.service.sweep_forever())
        self.service.log_start()
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def create_app(export: ExportDir, config: ServerConfig) -> Starlette:
    """The Starlette app serving ``export``'s ``cloud/backbone`` graph.

    Its :class:`BackboneService` (the sessions and limits) is ``app.state.backbone``; a gRPC server
    given the same service (:func:`~shadowpeft.runtime.grpc_server.start_grpc_server`) shares them.

    Args:
        export: An opened (and verified) export, see :func:`~shadowpeft.runtime.export_dir.open_export`.
        config: Auth and limits.

    Raises:
        ExportLoadError: If the export has no ``cloud/backbone`` graph or it is not a backbone.
    """
    service = BackboneService(export, config)
    backbone = _HttpRoutes(service)
    models = "/v2/models/{name}"
    routes = [
        Route("/v2/health/live", backbone.live, methods=["GET"]),
        Route("/v2/health/ready", backbone.ready, methods=["GET"]),
        Route("/v2", backbone.server_metadata, methods=["GET"]),
    ]
    for base in (models, models + "/versions/{version}"):
        routes += [
            Route(base, backbone.model_metadata, methods=["GET"]),
            Route(base + "/ready", backbone.model_ready, methods=["GET"]),
            Route(base + "/stats", backbone.model_stats, methods=["GET"]),
            Route(base + "/config", backbone.model_configuration, methods=["GET"]),
            Route(base + "/infer", backbone.infer, methods=["POST"]),
        ]
    handlers = {
        ProtocolError: _error_response,
        ServerRejected: _error_response,
        SessionLost: _error_response,
        HTTPException: _error_response,
        Exception: _error_response,
    }
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=backbone.lifespan)
    app.state.backbone = service
    app.add_middleware(AccessGate, token=config.token, read_timeout=config.connections.read_timeout)
    return app


def serving_options(app: Starlette) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for serving ``app`` (from :func:`create_app`).

    Its connection limits (``ServerConfig.connections``: connection cap, header read deadline,
    keep-alive timeout, listen backlog), no access log (the app logs each request), no websockets.
    """
    limits = app.state.backbone.config.connections
    return {"access_log": False, "ws": "none", **uvicorn_options(limits)}


async def serve(server: uvicorn.Server, *, grpc: Any = None, sockets: list | None = None) -> None:
    """Runs uvicorn ``server`` (its app from :func:`create_app`) until it exits, and with it, on the same
    event loop (one session table, one request gate), the gRPC service when ``grpc`` is a
    :class:`~shadowpeft.runtime.grpc_server.GrpcOptions` (the port it bound: ``app.state.grpc_port``)."""
    if grpc is None:
        await server.serve(sockets=sockets)
        return
    from shadowpeft.runtime.grpc_server import start_grpc_server

    app = server.config.app
    grpc_server, app.state.grpc_port = await start_grpc_server(app.state.backbone, grpc)
    try:
        await server.serve(sockets=sockets)
    finally:
        await grpc_server.stop(grace=1.0)


def run_server(
    app: Starlette, *, host: str, port: int, log_level: str = "info", grpc: Any = None, **options: Any
) -> None:
    """Serves ``app`` with uvicorn until interrupted (extra options go to ``uvicorn.Config``, e.g. TLS files),
    and the KServe v2 gRPC service beside it when ``grpc`` (:class:`~shadowpeft.runtime.grpc_server.GrpcOptions`)
    is given."""
    if grpc is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level, **serving_options(app), **options)
        return
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **serving_options(app), **options)
    asyncio.run(serve(uvicorn.Server(config), grpc=grpc))  # one loop: grpc.aio and uvicorn share the sessions


# --- errors ------------------------------------------------------------------------------------------


async def _error_response(request: Request, exc: Exception) -> Response:
    """Every error as JSON ``{"error": message}`` with its status (KServe's error body)."""
    if isinstance(exc, SessionLost):
        status = 409
    elif isinstance(exc, ServerRejected):
        status = exc.status or 400
    elif isinstance(exc, ProtocolError):
        status = 400
    elif isinstance(exc, HTTPException):
        status = exc.status_code
    else:  # a bug: uvicorn logs the traceback
        status = 500
        exc = RuntimeError(
            f"The server failed on this request ({type(exc).__name__}: {exc}). The sequence's cache is unchanged; "
            "this is a bug or an input the graph cannot take."
        )
    message = exc.detail if isinstance(exc, HTTPException) else str(exc)
    if isinstance(exc, HTTPException) and status in (404, 405) and message in ("Not Found", "Method Not Allowed"):
        message = f"{message}: {request.method} {request.url.path}. This server answers {_ROUTES}."
    retry = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry)} if retry is not None else {}
    if status == 408:  # the rest of the body may still trickle in: close instead of reading it
        headers["Connection"] = "close"
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)
