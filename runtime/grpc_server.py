"""The backbone server over gRPC: the KServe v2 ``inference.GRPCInferenceService`` (``shadow-serve --grpc-port``).

The gRPC transport beside the HTTP one (:mod:`shadowpeft.runtime.server`), over the same
:class:`~shadowpeft.runtime.backbone_service.BackboneService` on the same event loop: one session
table, one request gate, one KV budget, whichever protocol a request came by. Served methods::

    ServerLive, ServerReady                  open (like /v2/health/*)
    ServerMetadata, ModelMetadata,
    ModelReady, ModelConfig, ModelStatistics  bearer token
    ModelInfer                               bearer token; tensors in raw_input_contents (or typed
                                             contents), sequence_id/start/end/offset as InferParameters
    (streaming, repository, shared memory, trace, log: UNIMPLEMENTED)

The bearer token travels in the call's metadata, ``authorization: Bearer TOKEN``. Refusals carry the
HTTP transport's messages, with the status mapped by
:data:`~shadowpeft.runtime.grpc_tensors.GRPC_CODES` (a 503's ``Retry-After`` travels as trailing
metadata ``retry-after``). Limits: a message above ``max_body_bytes`` is refused
by gRPC itself (RESOURCE_EXHAUSTED, before any handler runs); ``max_connections`` caps the calls in
flight (RESOURCE_EXHAUSTED beyond); tokens per request, requests in flight and queued, sessions and
the KV budget are the service's, as over HTTP. The JSON limit has no gRPC counterpart (no JSON), and
the Host/Origin checks of ``--no-auth`` neither: browsers cannot make gRPC calls.

``ModelConfig`` answers a Triton ``ModelConfig`` whose ``parameters["shadowpeft"]`` holds the model
metadata's ``shadowpeft`` object as JSON (gRPC's ``ModelMetadataResponse`` has no room for it): the
device's handshake reads it there.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from shadowpeft.runtime.access import bearer_problem
from shadowpeft.runtime.backbone_service import BackboneService
from shadowpeft.runtime.contract import HIDDEN_STATES, MODEL_NAME, MODEL_VERSION, SEQUENCE_LENGTH
from shadowpeft.runtime.errors import ProtocolError, ServerRejected, SessionLost
from shadowpeft.runtime.grpc_tensors import GRPC_CODES, decode_infer_request, encode_infer_response, grpc_modules
from shadowpeft.runtime.handshake import METADATA_KEY

__all__ = ["GrpcOptions", "start_grpc_server"]

logger = logging.getLogger(__name__)

_INLINE_DECODE_BYTES = 64 << 10  # larger messages are converted to arrays in the thread pool
_SERVICE = "inference.GRPCInferenceService"
_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
    "ModelInfer",
)


@dataclass(frozen=True)
class GrpcOptions:
    """Where and how the gRPC service listens.

    Attributes:
        host: Address to listen on (``shadow-serve --host``).
        port: Port (0: any free port; the bound one is left in ``app.state.grpc_port``).
        certfile: PEM certificate chain: serve TLS (``--ssl-certfile``), else plaintext.
        keyfile: Its private key (``--ssl-keyfile``).
    """

    host: str = "127.0.0.1"
    port: int = 8001
    certfile: Path | None = None
    keyfile: Path | None = None


async def start_grpc_server(service: BackboneService, options: GrpcOptions) -> tuple[Any, int]:
    """Starts the gRPC service for ``service`` on the running event loop.

    Returns:
        The ``grpc.aio.Server`` (stop it with ``await server.stop(grace)``) and the port it bound.

    Raises:
        ModuleNotFoundError: grpcio or tritonclient's gRPC modules are missing (the message says what to install).
        OSError: The port cannot be bound.
    """
    grpc, pb, _ = grpc_modules()
    server = grpc.aio.server(
        maximum_concurrent_rpcs=service.config.connections.max_connections,
        options=[
            ("grpc.max_receive_message_length", service.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port already taken is an error, not silently shared
        ],
    )
    servicer = _Servicer(service)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(pb, f"{name}Request").FromString,
            response_serializer=getattr(pb, f"{name}Response").SerializeToString,
        )
        for name in _METHODS
    }  # the service's other methods are not registered: gRPC answers UNIMPLEMENTED
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    address = f"[{options.host}]:{options.port}" if ":" in options.host else f"{options.host}:{options.port}"
    try:
        if options.certfile:
            key = Path(options.keyfile).read_bytes() if options.keyfile else None
            credentials = grpc.ssl_server_credentials([(key, Path(options.certfile).read_bytes())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpcio reports a port it cannot bind as RuntimeError
        raise OSError(f"gRPC cannot listen on {address} ({err}); choose another --grpc-port.") from None
    await server.start()
    logger.info("gRPC (KServe v2 GRPCInferenceService) on %s:%d", options.host, port)
    return server, port


def _rpc(*, open_call: bool = False) -> Callable:
    """Wraps a servicer method: the bearer token check (unless ``open_call``) and the error mapping."""

    def wrap(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def call(self: _Servicer, request: Any, context: Any) -> Any:
            try:
                if not open_call:
                    self.check_token(context)
                return await method(self, request, context)
            except (ServerRejected, SessionLost, ProtocolError) as err:
                refusal = err
            except Exception as err:  # a bug: log it, answer INTERNAL with the HTTP transport's message
                logger.exception("gRPC %s failed", method.__name__)
                refusal = RuntimeError(
                    f"The server failed on this request ({type(err).__name__}: {err}). The sequence's cache is "
                    "unchanged; this is a bug or an input the graph cannot take."
                )
            await self.abort(context, refusal)  # raises, ending the call

        return call

    return wrap


class _Servicer:
    """The ``inference.GRPCInferenceService`` methods this server answers (the rest: UNIMPLEMENTED)."""

    def __init__(self, service: BackboneService) -> None:
        self.service = service
        self.grpc, self.pb, _ = grpc_modules()
        token = service.config.token
        self.expected = f"Bearer {token}".encode() if token else None

    def check_token(self, context: Any) -> None:
        if self.expected is None:
            return
        metadata = context.invocation_metadata() or ()
        given = next((value for key, value in metadata if key == "authorization"), None)
        problem = bearer_problem(given.encode() if isinstance(given, str) else given, self.expected)
        if problem is not None:
            raise ServerRejected(problem, status=401)

    async def abort(self, context: Any, err: Exception) -> None:
        status = 409 if isinstance(err, SessionLost) else 400 if isinstance(err, ProtocolError) else 500
        if isinstance(err, ServerRejected):
            status = err.status or 400
        retry = getattr(err, "retry_after", None)
        trailers = (("retry-after", str(retry)),) if retry is not None else ()
        code = getattr(self.grpc.StatusCode, GRPC_CODES.get(status, "UNKNOWN"))
        await context.abort(code, str(err), trailing_metadata=trailers)

    # --- health and metadata ---------------------------------------------------------------------

    @_rpc(open_call=True)
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the proto's method names
        return self.pb.ServerLiveResponse(live=True)

    @_rpc(open_call=True)
    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self.pb.ServerReadyResponse(ready=True)

    @_rpc()
    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.service.check_model(request.name, request.version or None)
        return self.pb.ModelReadyResponse(ready=True)

    @_rpc()
    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        return self.pb.ServerMetadataResponse(**self.service.server_metadata())

    @_rpc()
    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self.service.check_model(request.name, request.version or None)
        metadata = self.service.model_metadata()
        tensor = self.pb.ModelMetadataResponse.TensorMetadata
        return self.pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata["versions"],
            platform=metadata["platform"],
            inputs=[tensor(**entry) for entry in metadata["inputs"]],
            outputs=[tensor(**entry) for entry in metadata["outputs"]],
        )

    @_rpc()
    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        from google.protobuf import json_format
        from tritonclient.grpc import model_config_pb2 as mc

        self.service.check_model(request.name, request.version or None)
        config = json_format.ParseDict(self.service.model_config(), mc.ModelConfig())  # the HTTP /config's
        # gRPC's model metadata has no room for the backbone identity the device's handshake compares
        config.parameters[METADATA_KEY].string_value = json.dumps(self.service.identity())
        return self.pb.ModelConfigResponse(config=config)

    @_rpc()
    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        if request.name:
            self.service.check_model(request.name, request.version or None)
        model = self.service.model_stats()["model_stats"][0]
        return self.pb.ModelStatisticsResponse(model_stats=[self.pb.ModelStatistics(**model)])

    # --- inference ---------------------------------------------------------------------------------

    @_rpc()
    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        service = self.service
        service.check_model(request.model_name, request.model_version or None)
        async with service.gate.enter():  # the same places as HTTP requests
            size = request.ByteSize()
            if size > _INLINE_DECODE_BYTES:  # converting large typed contents would stall every other session
                decoded = await run_in_threadpool(decode_infer_request, request)
            else:
                decoded = decode_infer_request(request)
            result = await service.run_step(decoded.inputs, decoded.parameters, decoded.outputs)
            response = encode_infer_response(
                {HIDDEN_STATES: result.hidden},
                model_name=MODEL_NAME,
                model_version=MODEL_VERSION,
                parameters={SEQUENCE_LENGTH: result.sequence_length},
                request_id=decoded.id,
            )
        sent = response.ByteSize()
        service.record(result, bytes_in=size, bytes_out=sent)
        logger.debug("gRPC ModelInfer %s in=%dB out=%dB", result.summary, size, sent)
        return response
