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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shadowpeft.runtime.access import LOG_KEY as _LOG_KEY
from shadowpeft.runtime.access import AccessGate
from shadowpeft.runtime.admission import RequestGate, RequestLimits, body_bytes_for, read_body
from shadowpeft.runtime.connections import ConnectionLimits, uvicorn_options
from shadowpeft.runtime.contract import (
    CLOUD_BACKBONE,
    HIDDEN_STATES,
    INPUT_IDS,
    MODEL_NAME,
    MODEL_VERSION,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_LENGTH,
    SEQUENCE_OFFSET,
    SEQUENCE_START,
    SHADOW_STATES,
)
from shadowpeft.runtime.errors import ExportLoadError, ProtocolError, ServerRejected, SessionLost, format_problems
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.kv import KVCache, kv_bytes_per_token
from shadowpeft.runtime.model_config import PLATFORM, SHADOW_STATES_DATATYPES, model_config, served_tensors
from shadowpeft.runtime.protocol import HEADER_LENGTH, datatype_of, decode_request, encode_response
from shadowpeft.runtime.protocol import parse_header_length as _header_length
from shadowpeft.runtime.sessions import BackboneRunner, Session, SessionLimits, SessionTable

__all__ = ["ServerConfig", "create_app", "run_server", "serving_options"]

logger = logging.getLogger(__name__)

_ROUTES = "GET /v2, /v2/health/live|ready, /v2/models/NAME[/versions/1][/ready|/stats|/config]; POST .../infer"
_MAX_ID_CHARS = 256
_ORT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidArgument", "RuntimeException", "EPFail")
)
_REPLAY_ELEMENTS = 1 << 16  # steps up to this many hidden values are kept for an idempotent retry
_INLINE_DECODE_BYTES = 64 << 10  # larger bodies are decoded in the thread pool
_REFUSALS = ("sessions", "kv_budget", "busy", "tokens_per_request", "body_bytes", "json_bytes")
_JSON_COST = (
    "parsing JSON costs about 14x its size; send tensors as binary data (the binary tensor extension: "
    "BackboneClient does, tritonclient with binary_data=True) or fewer tokens per request"
)


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs.

    Attributes:
        token: Bearer token every request but health checks must carry; ``None`` disables auth
            (the CLI allows that on loopback only).
        limits: Max sessions, max tokens per session, idle TTL, KV budget.
        requests: Tokens, body and JSON bytes per request; requests in flight and queued.
        connections: Connection cap and read and keep-alive timeouts (applied by :func:`serving_options`).
    """

    token: str | None
    limits: SessionLimits = field(default_factory=SessionLimits)
    requests: RequestLimits = field(default_factory=RequestLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass(frozen=True)
class _Step:
    """One validated infer request."""

    sequence_id: int | str
    start: bool
    end: bool
    offset: int | None
    ids: np.ndarray  # (1, T) int64
    s0: np.ndarray  # (1, T, d) float16 or float32, as sent


class _Backbone:
    """Routes and state of one app: the runner, the session table and the config."""

    def __init__(self, export: ExportDir, config: ServerConfig) -> None:
        if not export.has(CLOUD_BACKBONE):
            raise ExportLoadError(
                f"{export.root} has no {CLOUD_BACKBONE!r} graph (it has: "
                f"{', '.join(sorted(export.manifest.graphs))}). "
                "shadow-serve serves the cloud half of a split export; re-export with `shadow-export CKPT --split`."
            )
        self.export, self.config = export, config
        self.spec = export.graph(CLOUD_BACKBONE)
        self.runner = BackboneRunner(export.session(CLOUD_BACKBONE), self.spec)
        per_token = kv_bytes_per_token(self.spec)
        self.table = SessionTable(config.limits, self.runner.empty_past, kv_bytes_per_token=per_token)
        requests = config.requests
        self.max_body_bytes = requests.max_body_bytes or body_bytes_for(
            requests.max_tokens, self.runner.hidden_size, requests.max_json_bytes
        )
        self.gate = RequestGate(requests.max_concurrent, requests.max_queued)
        self.vocab = export.manifest.vocab_size
        self.inferences = 0
        self.last_inference_ms = 0

    # --- metadata and health ---------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def server_metadata(self, request: Request) -> Response:
        version = importlib.metadata.version("shadowpeft")
        return JSONResponse(
            {
                "name": "shadowpeft",
                "version": version,
                "extensions": ["binary_tensor_data", "sequence", "model_configuration"],
            }
        )

    async def model_metadata(self, request: Request) -> Response:
        self._model(request)
        d = self.runner.hidden_size
        inputs, outputs = served_tensors(d)
        return JSONResponse(
            {
                "name": MODEL_NAME,
                "versions": [MODEL_VERSION],
                "platform": PLATFORM,
                "inputs": [tensor.metadata() for tensor in inputs],
                "outputs": [tensor.metadata() for tensor in outputs],
                "shadowpeft": {
                    "accepted_datatypes": {SHADOW_STATES: list(SHADOW_STATES_DATATYPES)},
                    "output_datatype": f"the datatype of {SHADOW_STATES}",
                    "hidden_size": d,
                    "vocab_size": self.vocab,
                    "base_model": self.export.manifest.base_model,
                    "base_fingerprint": self.export.manifest.base_fingerprint,
                    "graph_sha256": self.spec.sha256,
                    "graph_external_data": dict(self.spec.external_data),  # weights stored outside the graph
                    "max_sessions": self.config.limits.max_sessions,
                    "max_tokens_per_session": self.config.limits.max_tokens,
                    "idle_ttl_s": self.config.limits.idle_ttl,
                    "max_tokens_per_request": self.config.requests.max_tokens,
                    "max_body_bytes": self.max_body_bytes,
                    "max_json_bytes": self.config.requests.max_json_bytes,
                    "kv_budget_bytes": self.config.limits.kv_budget_bytes,
                    "kv_bytes_per_token": self.table.kv_bytes_per_token,
                },
            }
        )

    async def model_configuration(self, request: Request) -> Response:
        """Triton's model-configuration extension (``tritonclient``'s ``get_model_config``)."""
        self._model(request)
        limits = self.config.limits
        return JSONResponse(
            model_config(self.export.manifest, self.spec, hidden_size=self.runner.hidden_size, limits=limits)
        )

    async def model_ready(self, request: Request) -> Response:
        self._model(request)
        return JSONResponse({"name": MODEL_NAME, "ready": True})

    async def model_stats(self, request: Request) -> Response:
        """Triton-style ``model_stats`` plus ``sequences`` (live count, tokens and KV bytes held against the
        budget, counters, bytes), ``requests`` (in flight, queued) and ``refused`` (refusals by reason)."""
        self._model(request)
        table, stats = self.table, self.table.stats
        sequences = {
            "active": len(table),
            "tokens": table.tokens(),
            "kv_bytes": table.kv_bytes(),
            "kv_budget_bytes": table.limits.kv_budget_bytes,
            "kv_bytes_per_token": table.kv_bytes_per_token,
            **{key: value for key, value in vars(stats).items() if key != "refused"},
        }
        requests = {"in_flight": self.gate.inside, "queued": self.gate.waiting}
        refused = {reason: 0 for reason in _REFUSALS} | dict(stats.refused) | {"busy": self.gate.refused}
        model = {
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inferences,
            "execution_count": self.inferences,
        }
        return JSONResponse({"model_stats": [model], "sequences": sequences, "requests": requests, "refused": refused})

    # --- inference ---------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        self._model(request)
        limit, option, hint = self._body_limit(request)  # 413 before reading, when the headers say so
        async with self.gate.enter():  # bounds the bodies, parsed tensors and steps held at once
            try:
                body = await read_body(request, limit, option, hint)
            except ServerRejected as err:
                if err.status == 413:
                    self.table.stats.refused["json_bytes" if "json" in option else "body_bytes"] += 1
                raise
            size = _header_length(request.headers.get(HEADER_LENGTH), len(body))
            if len(body) > _INLINE_DECODE_BYTES:  # parsing a large JSON body would stall every other session
                decoded = await run_in_threadpool(decode_request, body, size)
            else:
                decoded = decode_request(body, size)
            _check_outputs(decoded.outputs)
            step = self._validate(decoded.inputs, decoded.parameters)
            self._check_tokens(step)
            hidden, session = await self._advance(step)
            binary = decoded.binary_outputs if decoded.outputs is None else decoded.outputs[HIDDEN_STATES]
            content, json_size = encode_response(
                {HIDDEN_STATES: hidden.astype(step.s0.dtype, copy=False)},
                model_name=MODEL_NAME,
                model_version=MODEL_VERSION,
                binary=binary,
                parameters={SEQUENCE_LENGTH: session.length},
                request_id=decoded.id,
            )
        session.bytes_in, session.bytes_out = session.bytes_in + len(body), session.bytes_out + len(content)
        self.table.stats.bytes_in += len(body)
        self.table.stats.bytes_out += len(content)
        self.inferences, self.last_inference_ms = self.inferences + 1, int(time.time() * 1000)
        request.scope[_LOG_KEY] = (
            f"sequence={step.sequence_id!r} start={step.start} end={step.end} T={step.ids.shape[1]} "
            f"length={session.length} in={len(body)}B out={len(content)}B"
        )
        headers = {HEADER_LENGTH: str(json_size)} if json_size is not None else {}
        media = "application/octet-stream" if json_size is not None else "application/json"
        return Response(content, headers=headers, media_type=media)

    def _check_tokens(self, step: _Step) -> None:
        """Refuses (413) a request of more tokens than ``--max-tokens-per-request``, before any table change."""
        tokens, cap = step.ids.shape[1], self.config.requests.max_tokens
        if tokens > cap:
            self.table.stats.refused["tokens_per_request"] += 1
            raise ServerRejected(
                f"This request carries {tokens} tokens; this server takes at most {cap} per request "
                f"(--max-tokens-per-request). Send the prompt in chunks of at most {cap} tokens "
                f"(BackboneClient(max_chunk_tokens=...) does). Sequence {step.sequence_id!r} is unchanged.",
                status=413,
            )

    def _body_limit(self, request: Request) -> tuple[int, str, str]:
        """The body limit for ``request``, its option and the advice for a client over it; a JSON header
        over ``--max-json-bytes`` is refused (413) here, before the body is read."""
        json_limit, tokens = self.config.requests.max_json_bytes, self.config.requests.max_tokens
        chunks = (
            f"Send at most {tokens} tokens per request (--max-tokens-per-request): split a longer prompt into "
            "chunks (BackboneClient(max_chunk_tokens=...))."
        )
        declared = request.headers.get(HEADER_LENGTH, "").strip()
        if HEADER_LENGTH not in request.headers:  # the whole body is JSON
            if json_limit < self.max_body_bytes:
                return json_limit, "--max-json-bytes", f"A body without {HEADER_LENGTH} is all JSON: {_JSON_COST}."
        # A malformed value (not 1-20 ASCII digits: '²' passes isdigit() and int() refuses 5,000 digits) falls
        # through to parse_header_length's 400.
        elif declared.isascii() and declared.isdigit() and len(declared) <= 20 and int(declared) > json_limit:
            self.table.stats.refused["json_bytes"] += 1
            raise ServerRejected(
                f"The JSON header of this request has {declared} bytes ({HEADER_LENGTH}); this server accepts at "
                f"most {json_limit} (--max-json-bytes): {_JSON_COST}.",
                status=413,
            )
        return self.max_body_bytes, "--max-body-bytes", chunks

    async def _advance(self, step: _Step) -> tuple[np.ndarray, Session]:
        """Runs ``step`` on its sequence under the sequence's lock; other sequences run meanwhile.

        A ``sequence_start`` runs on a new session that replaces the old one under its id only once the
        step succeeded (:meth:`SessionTable.commit`); a sequence whose ``sequence_end`` step is out of
        sync is freed anyway (its client is done with it).
        """
        table = self.table
        session = table.open(step.sequence_id) if step.start else table.get(step.sequence_id)
        try:
            async with session.lock:
                if not step.start and not table.is_current(session):
                    raise SessionLost(
                        f"Sequence {step.sequence_id!r} was restarted or ended by another request while this one "
                        "waited. Re-send its whole history with sequence_start=true."
                    )
                hidden = await self._compute(session, step)
        except SessionLost:
            if step.end:
                table.end(session)
            raise
        finally:
            table.release(session)
        if step.end:
            table.end(session)
        return hidden, session

    async def _compute(self, session: Session, step: _Step) -> np.ndarray:
        new = step.ids.shape[1]
        empty = np.zeros((1, 0, self.runner.hidden_size), dtype=np.float32)
        if new == 0 and step.end and not step.start:
            return empty  # a bare sequence_end ends the sequence whatever its offset says
        digest = _digest(step) if new * self.runner.hidden_size <= _REPLAY_ELEMENTS else b""  # only small steps replay
        past, offset = session.past, session.length
        if step.offset is not None and step.offset != session.length:
            hidden = session.replay(step.offset, new, digest)
            if hidden is not None:  # a retry of the last step whose response was lost
                return hidden
            if step.offset > session.length:
                raise SessionLost(
                    f"Sequence {step.sequence_id!r} holds {session.length} tokens on the server, but this request "
                    f"continues at sequence_offset {step.offset}: client and server are out of sync (a lost "
                    "response or a restart). Re-send the whole history with sequence_start=true."
                )
            # A rollback (e.g. draft tokens the device rejected): continue after the first `offset` tokens.
            # The trimmed cache replaces the session's only once the step succeeded.
            past, offset = KVCache(session.past.past), step.offset
            past.trim(session.length - offset)
        if offset + new > self.config.limits.max_tokens:
            raise ServerRejected(
                f"Sequence {step.sequence_id!r} would hold {offset + new} tokens; this server allows "
                f"{self.config.limits.max_tokens} per sequence (--max-tokens-per-session). End it "
                "(sequence_end=true) and start a shorter one.",
                status=400,
            )
        self.table.admit(session, offset + new)  # a slot and the KV bytes, or 503 with nothing changed
        if new == 0:  # a rollback only (or an empty start)
            session.last_step = session.last_step if offset == session.length else None
            self.table.commit(session, past, offset)
            return empty
        try:
            hidden, present = await run_in_threadpool(self.runner.run, past, step.ids, step.s0)
        except _ORT_ERRORS as err:
            raise ServerRejected(
                f"onnxruntime failed on this step ({type(err).__name__}: {err}); the sequence's cache is unchanged.",
                status=500,
            ) from err
        self.table.commit(session, present, offset + new)
        session.steps += 1
        session.last_step = (offset, new, digest, hidden) if digest else None
        return hidden

    def _validate(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> _Step:
        """Checks every tensor and sequence parameter; raises one 400 listing every problem."""
        problems = _input_problems(inputs, self.runner.hidden_size, self.vocab)
        sequence_id, start, end, offset = _sequence_parameters(parameters, problems)
        if problems:
            header = (
                f"Invalid request for model {MODEL_NAME!r} (expects {INPUT_IDS} INT64 [1, T] and {SHADOW_STATES} "
                f"FP32 or FP16 [1, T, {self.runner.hidden_size}], plus parameter {SEQUENCE_ID}):"
            )
            raise ServerRejected(format_problems(header, problems), status=400)
        return _Step(sequence_id, start, end, offset, inputs[INPUT_IDS], inputs[SHADOW_STATES])

    def _model(self, request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
        if name != MODEL_NAME or version != MODEL_VERSION:
            shown = name if "version" not in request.path_params else f"{name}/versions/{version}"
            raise HTTPException(
                404, f"Unknown model {shown!r}. This server serves {MODEL_NAME!r} (version {MODEL_VERSION})."
            )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """Sweeps idle sessions in the background while the server runs."""
        task = asyncio.create_task(self._sweep())
        limits, requests = self.config.limits, self.config.requests
        logger.info(
            "serving %s (d=%d) as %r: at most %d sessions x %d tokens, KV budget %d B (%d B/token), "
            "%d tokens and %d B per request, %d in flight, idle TTL %gs, auth %s",
            self.export.root, self.runner.hidden_size, MODEL_NAME, limits.max_sessions, limits.max_tokens,
            limits.kv_budget_bytes, self.table.kv_bytes_per_token, requests.max_tokens, self.max_body_bytes,
            requests.max_concurrent, limits.idle_ttl, "on" if self.config.token else "OFF",
        )  # fmt: skip
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _sweep(self) -> None:
        interval = min(max(self.config.limits.idle_ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            if dropped := self.table.sweep():
                logger.info("dropped %d sessions idle for more than %gs", dropped, self.config.limits.idle_ttl)


def create_app(export: ExportDir, config: ServerConfig) -> Starlette:
    """The Starlette app serving ``export``'s ``cloud/backbone`` graph.

    Args:
        export: An opened (and verified) export, see :func:`~shadowpeft.runtime.export_dir.open_export`.
        config: Auth and limits.

    Raises:
        ExportLoadError: If the export has no ``cloud/backbone`` graph or it is not a backbone.
    """
    backbone = _Backbone(export, config)
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
            Route(base + "/config", backbone.model_configuration, methods=["GET"]),
            Route(base + "/stats", backbone.model_stats, methods=["GET"]),
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
    app.state.backbone = backbone
    app.add_middleware(AccessGate, token=config.token, read_timeout=config.connections.read_timeout)
    return app


def serving_options(app: Starlette) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for serving ``app`` (from :func:`create_app`).

    Its connection limits (``ServerConfig.connections``: connection cap, header read deadline,
    keep-alive timeout, listen backlog), no access log (the app logs each request), no websockets.
    """
    limits = app.state.backbone.config.connections
    return {"access_log": False, "ws": "none", **uvicorn_options(limits)}


def run_server(app: Starlette, *, host: str, port: int, log_level: str = "info", **options: Any) -> None:
    """Serves ``app`` with uvicorn until interrupted (extra options go to ``uvicorn.Config``, e.g. TLS files)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, **serving_options(app), **options)


# --- request helpers ---------------------------------------------------------------------------------


def _check_outputs(outputs: dict[str, bool] | None) -> None:
    unknown = sorted(set(outputs or {}) - {HIDDEN_STATES})
    if unknown:
        raise ServerRejected(
            f"Unknown requested output(s) {', '.join(map(repr, unknown))}; model {MODEL_NAME!r} returns only "
            f"{HIDDEN_STATES!r}.",
            status=400,
        )
    if outputs is not None and not outputs:
        raise ServerRejected(f"'outputs' is empty; request {HIDDEN_STATES!r} or omit 'outputs'.", status=400)


def _input_problems(inputs: dict[str, np.ndarray], d: int, vocab: int | None) -> list[str]:
    problems = [
        f"unknown input {name!r}; this model takes {INPUT_IDS!r} and {SHADOW_STATES!r}"
        for name in inputs
        if name not in (INPUT_IDS, SHADOW_STATES)
    ]
    ids, s0 = inputs.get(INPUT_IDS), inputs.get(SHADOW_STATES)
    if ids is None:
        problems.append(f"input {INPUT_IDS!r} is missing: INT64 [1, T]")
    elif ids.dtype != np.int64:
        problems.append(f"input {INPUT_IDS!r} has datatype {datatype_of(ids.dtype)}; expected INT64")
    elif ids.ndim != 2 or ids.shape[0] != 1:
        problems.append(f"input {INPUT_IDS!r} has shape {list(ids.shape)}; expected [1, T] (one sequence per request)")
    elif ids.size and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        problems.append(f"input {INPUT_IDS!r} holds token id {bad}; ids must be in [0, {vocab})")
    if s0 is None:
        problems.append(f"input {SHADOW_STATES!r} is missing: FP32 or FP16 [1, T, {d}]")
    elif s0.dtype not in (np.float32, np.float16):
        problems.append(f"input {SHADOW_STATES!r} has datatype {datatype_of(s0.dtype)}; expected FP32 or FP16")
    elif s0.ndim != 3 or s0.shape[0] != 1 or s0.shape[2] != d:
        problems.append(f"input {SHADOW_STATES!r} has shape {list(s0.shape)}; expected [1, T, {d}]")
    elif ids is not None and ids.shape[:1] == (1,) and ids.ndim == 2 and ids.shape[1] != s0.shape[1]:
        problems.append(
            f"input {SHADOW_STATES!r} has {s0.shape[1]} rows but {INPUT_IDS!r} has {ids.shape[1]} tokens; "
            "send one shadow state per token"
        )
    elif not np.isfinite(s0).all():
        problems.append(f"input {SHADOW_STATES!r} holds NaN or infinite values")
    return problems


def _sequence_parameters(parameters: dict[str, Any], problems: list[str]) -> tuple[int | str, bool, bool, int | None]:
    sequence_id = parameters.get(SEQUENCE_ID)
    is_int = isinstance(sequence_id, int) and not isinstance(sequence_id, bool)
    if not (is_int and 0 < sequence_id < 2**64) and not (
        isinstance(sequence_id, str) and 0 < len(sequence_id) <= _MAX_ID_CHARS
    ):
        problems.append(
            f"parameter {SEQUENCE_ID!r} must be an integer in [1, 2**64) or a string of 1 to {_MAX_ID_CHARS} "
            f"characters; got {sequence_id!r} (the server keeps a KV cache per sequence)"
        )
    flags = []
    for key in (SEQUENCE_START, SEQUENCE_END):
        value = parameters.get(key, False)
        if not isinstance(value, bool):
            problems.append(f"parameter {key!r} must be true or false; got {value!r}")
        flags.append(value is True)
    offset = parameters.get(SEQUENCE_OFFSET)
    if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
        problems.append(f"parameter {SEQUENCE_OFFSET!r} must be an integer >= 0; got {offset!r}")
    return sequence_id, flags[0], flags[1], offset


def _digest(step: _Step) -> bytes:
    """A fingerprint of a step's inputs, kept instead of the inputs to recognise a retry."""
    return hashlib.blake2b(step.ids.tobytes() + step.s0.tobytes(), digest_size=16).digest()


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
