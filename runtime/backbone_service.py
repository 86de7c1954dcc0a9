"""What the backbone server does, whatever carries the request: KServe v2 over HTTP or over gRPC.

One :class:`BackboneService` per served export holds the runner, the session table, the request
gate and the counters; the transports (:mod:`shadowpeft.runtime.server` for HTTP,
:mod:`shadowpeft.runtime.grpc_server` for gRPC) decode a request, call it, and encode what it
returns, so both speak for the same sessions under the same limits::

    HTTP body / gRPC message ──decode──> inputs + parameters ──> BackboneService.run_step
        check outputs, tensors, sequence parameters (400) ─> tokens per request (413)
        ─> the sequence's lock ─> offset: replay / rollback / out of sync (409)
        ─> tokens per sequence (400) ─> a slot and the KV budget (503 + Retry-After) ─> the graph (500)
    <── hidden_states in the request's dtype + sequence_length ──encode── HTTP body / gRPC message

Every refusal is a :class:`~shadowpeft.runtime.errors.ServerRejected` with an HTTP status (or a
:class:`~shadowpeft.runtime.errors.SessionLost`: 409); each transport maps it to its own status
(gRPC: :data:`shadowpeft.runtime.grpc_tensors.GRPC_CODES`). Used from the server's event loop only.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from starlette.concurrency import run_in_threadpool

from shadowpeft.runtime.admission import RequestGate, RequestLimits, body_bytes_for
from shadowpeft.runtime.connections import ConnectionLimits
from shadowpeft.runtime.contract import (
    CLOUD_BACKBONE,
    HIDDEN_STATES,
    INPUT_IDS,
    MODEL_NAME,
    MODEL_VERSION,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_OFFSET,
    SEQUENCE_START,
    SHADOW_STATES,
)
from shadowpeft.runtime.errors import ExportLoadError, ServerRejected, SessionLost, format_problems
from shadowpeft.runtime.export_dir import ExportDir
from shadowpeft.runtime.handshake import METADATA_KEY
from shadowpeft.runtime.kv import KVCache, kv_bytes_per_token
from shadowpeft.runtime.memory import MemoryGuard, plan_memory, warm_up_step
from shadowpeft.runtime.model_config import PLATFORM, SHADOW_STATES_DATATYPES, model_config, served_tensors
from shadowpeft.runtime.protocol import datatype_of
from shadowpeft.runtime.sessions import BackboneRunner, Session, SessionLimits, SessionTable

__all__ = ["BackboneService", "ServerConfig", "StepResult"]

logger = logging.getLogger(__name__)

_MAX_ID_CHARS = 256
_ORT_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("Fail", "InvalidArgument", "RuntimeException", "EPFail")
)
_REPLAY_ELEMENTS = 1 << 16  # steps up to this many hidden values are kept for an idempotent retry
_REFUSALS = ("sessions", "kv_budget", "busy", "tokens_per_request", "body_bytes", "json_bytes")


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs.

    Attributes:
        token: Bearer token every request but health checks must carry; ``None`` disables auth
            (the CLI allows that on loopback only).
        limits: Max sessions, max tokens per session, idle TTL, KV budget.
        requests: Tokens, body and JSON bytes per request; requests in flight and queued.
        connections: Connection cap and read and keep-alive timeouts (HTTP: applied by
            :func:`~shadowpeft.runtime.server.serving_options`; gRPC: the cap counts calls in flight).
        memory_budget: Bytes of RSS the whole process may hold (:mod:`~shadowpeft.runtime.memory`); ``None``:
            no process-wide check (the KV and request limits still bound what requests can add).
    """

    token: str | None
    limits: SessionLimits = field(default_factory=SessionLimits)
    requests: RequestLimits = field(default_factory=RequestLimits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    memory_budget: int | None = None


@dataclass(frozen=True)
class _Step:
    """One validated infer request."""

    sequence_id: int | str
    start: bool
    end: bool
    offset: int | None
    ids: np.ndarray  # (1, T) int64
    s0: np.ndarray  # (1, T, d) float16 or float32, as sent


@dataclass(frozen=True)
class StepResult:
    """What :meth:`BackboneService.run_step` returns to the transport.

    Attributes:
        hidden: ``hidden_states`` (1, T, d) in the dtype of the request's ``shadow_states``.
        sequence_length: Tokens the server holds for the sequence after the step (the response parameter).
        session: The sequence's session (for its byte counters).
        summary: One line for the request's debug log.
    """

    hidden: np.ndarray
    sequence_length: int
    session: Session
    summary: str


class BackboneService:
    """The transport-independent backbone server: one export's graph, sessions, limits and counters.

    Args:
        export: An opened (and verified) export, see :func:`~shadowpeft.runtime.export_dir.open_export`.
        config: Auth and limits.

    Raises:
        ExportLoadError: If the export has no ``cloud/backbone`` graph or it is not a backbone.
    """

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
        self.memory = self._memory_guard(config.memory_budget) if config.memory_budget else None
        self.gate = RequestGate(requests.max_concurrent, requests.max_queued, memory=self.memory)
        self.vocab = export.manifest.vocab_size
        self.inferences = 0
        self.last_inference_ms = 0

    # --- metadata ----------------------------------------------------------------------------------

    def check_model(self, name: str, version: str | None) -> None:
        """Refuses (404) any model but ``shadow-backbone`` version 1 (``version`` ``None``: not given)."""
        if name != MODEL_NAME or (version is not None and version != MODEL_VERSION):
            shown = name if version is None else f"{name}/versions/{version}"
            raise ServerRejected(
                f"Unknown model {shown!r}. This server serves {MODEL_NAME!r} (version {MODEL_VERSION}).", status=404
            )

    @staticmethod
    def server_metadata() -> dict[str, Any]:
        """The server metadata: name, version, protocol extensions."""
        version = importlib.metadata.version("shadowpeft")
        extensions = ["binary_tensor_data", "sequence", "model_configuration"]
        return {"name": "shadowpeft", "version": version, "extensions": extensions}

    def model_metadata(self) -> dict[str, Any]:
        """The model metadata, with the backbone's identity and the limits under ``shadowpeft``."""
        inputs, outputs = served_tensors(self.runner.hidden_size)
        return {
            "name": MODEL_NAME,
            "versions": [MODEL_VERSION],
            "platform": PLATFORM,
            "inputs": [tensor.metadata() for tensor in inputs],
            "outputs": [tensor.metadata() for tensor in outputs],
            METADATA_KEY: self.identity(),
        }

    def model_config(self) -> dict[str, Any]:
        """Triton's model configuration of the served backbone (JSON form; runtime/model_config.py)."""
        d, limits = self.runner.hidden_size, self.config.limits
        return model_config(self.export.manifest, self.spec, hidden_size=d, limits=limits)

    def identity(self) -> dict[str, Any]:
        """The ``shadowpeft`` extension of the model metadata: what the device's handshake compares, and limits."""
        return {
            "accepted_datatypes": {SHADOW_STATES: list(SHADOW_STATES_DATATYPES)},
            "output_datatype": f"the datatype of {SHADOW_STATES}",
            "hidden_size": self.runner.hidden_size,
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
        }

    def _memory_guard(self, budget: int) -> MemoryGuard:
        """Measures the loaded graphs and one largest request (a warm-up step) and checks ``budget`` holds
        them with the KV budget and every request in flight (:func:`~shadowpeft.runtime.memory.plan_memory`)."""
        config, runner = self.config, self.runner
        warm_up = warm_up_step(
            lambda ids, s0: runner.run(runner.empty_past(), ids, s0),
            config.requests.max_tokens,
            runner.hidden_size,
            runner.states_dtype,
        )
        # Beside its step, a request holds its body, the decoded tensors and the response (about a body each),
        # and extending a sequence's cache briefly holds the old and the new copy of it.
        past_copy = min(config.limits.kv_budget_bytes, config.limits.max_tokens * self.table.kv_bytes_per_token)
        plan = plan_memory(
            budget,
            warm_up,
            kv_budget=config.limits.kv_budget_bytes,
            concurrent=config.requests.max_concurrent,
            tokens=config.requests.max_tokens,
            request_bytes=3 * self.max_body_bytes + past_copy,
        )
        return MemoryGuard(plan)

    def model_stats(self) -> dict[str, Any]:
        """Triton-style ``model_stats`` plus ``sequences`` (live count, tokens and KV bytes held against the
        budget, counters, bytes), ``requests`` (in flight, queued) and ``refused`` (refusals by reason)."""
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
        refused["memory"] = self.memory.refused if self.memory else 0
        model = {
            "name": MODEL_NAME,
            "version": MODEL_VERSION,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inferences,
            "execution_count": self.inferences,
        }
        memory = self.memory.stats() if self.memory else None
        body = {"model_stats": [model], "sequences": sequences, "requests": requests, "refused": refused}
        return body | {"memory": memory}

    # --- inference ---------------------------------------------------------------------------------

    async def run_step(
        self, inputs: dict[str, np.ndarray], parameters: dict[str, Any], outputs: dict[str, bool] | None
    ) -> StepResult:
        """Validates one decoded infer request and runs it on its sequence (call inside ``self.gate.enter()``).

        Args:
            inputs: Tensors by name.
            parameters: Request parameters (``sequence_id``, ``sequence_start``, ...) as Python values.
            outputs: Requested outputs by name (``None``: all).

        Raises:
            ServerRejected: 400, 413, 500 or 503 (see the module docstring).
            SessionLost: The sequence is unknown, evicted, expired or out of sync (409).
        """
        _check_outputs(outputs)
        step = self._validate(inputs, parameters)
        self._check_tokens(step)
        hidden, session = await self._advance(step)
        summary = (
            f"sequence={step.sequence_id!r} start={step.start} end={step.end} T={step.ids.shape[1]} "
            f"length={session.length}"
        )
        return StepResult(hidden.astype(step.s0.dtype, copy=False), session.length, session, summary)

    def record(self, result: StepResult, *, bytes_in: int, bytes_out: int) -> None:
        """Counts one answered step and its bytes on the wire (for the stats)."""
        session = result.session
        session.bytes_in, session.bytes_out = session.bytes_in + bytes_in, session.bytes_out + bytes_out
        self.table.stats.bytes_in += bytes_in
        self.table.stats.bytes_out += bytes_out
        self.inferences, self.last_inference_ms = self.inferences + 1, int(time.time() * 1000)

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

    # --- background --------------------------------------------------------------------------------

    def log_start(self) -> None:
        """Logs what is served and under which limits (once, when the server starts)."""
        limits, requests = self.config.limits, self.config.requests
        logger.info(
            "serving %s (d=%d) as %r: at most %d sessions x %d tokens, KV budget %d B (%d B/token), "
            "%d tokens and %d B per request, %d in flight, idle TTL %gs, auth %s",
            self.export.root, self.runner.hidden_size, MODEL_NAME, limits.max_sessions, limits.max_tokens,
            limits.kv_budget_bytes, self.table.kv_bytes_per_token, requests.max_tokens, self.max_body_bytes,
            requests.max_concurrent, limits.idle_ttl, "on" if self.config.token else "OFF",
        )  # fmt: skip

    async def sweep_forever(self) -> None:
        """Drops idle sessions every quarter TTL (at most every 30 s) until cancelled."""
        interval = min(max(self.config.limits.idle_ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            if dropped := self.table.sweep():
                logger.info("dropped %d sessions idle for more than %gs", dropped, self.config.limits.idle_ttl)


# --- request checks ----------------------------------------------------------------------------------


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
