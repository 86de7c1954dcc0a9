"""``BackboneClient``'s gRPC wire: one attempt of each call to a KServe v2 ``GRPCInferenceService``.

For ``grpc://host:port`` (plaintext) and ``grpcs://host:port`` (TLS, verified against the system's
roots, or the PEM file ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` names), e.g.
``shadow-serve --grpc-port 8001``. The same requests as the HTTP wire (runtime/wire_http.py), as
gRPC calls: tensors in ``raw_input_contents``/``raw_output_contents``, the sequence parameters as
``InferParameter``s, the bearer token as metadata ``authorization: Bearer TOKEN``. What came back
maps to the same errors, by status code (the server's mapping: runtime/grpc_tensors.py)::

    UNAVAILABLE (no connection, a busy server), DEADLINE_EXCEEDED  -> Retryable
    ABORTED (the sequence is gone or out of sync)                  -> SessionLost
    INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED,
    NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED                   -> ServerRejected (status: the HTTP one)
    anything else, a malformed answer                              -> ServerUnavailable

The backbone's identity (what the handshake compares) is in ``ModelConfig``'s
``parameters["shadowpeft"]`` (JSON); :meth:`GrpcWire.metadata` puts it where the HTTP metadata has it.
Bytes counted are the protobuf messages' (without HTTP/2 framing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from shadowpeft.runtime.contract import HIDDEN_STATES
from shadowpeft.runtime.errors import (
    ProtocolError,
    Retryable,
    ServerRejected,
    ServerUnavailable,
    SessionLost,
    retry_after_seconds,
)
from shadowpeft.runtime.grpc_tensors import GRPC_CODES, decode_infer_response, encode_infer_request, grpc_modules
from shadowpeft.runtime.handshake import METADATA_KEY

__all__ = ["GRPC_SCHEMES", "GrpcWire"]

#: URL schemes this wire serves: plaintext and TLS.
GRPC_SCHEMES = ("grpc://", "grpcs://")
_RETRY_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")
_HTTP_STATUS = {name: status for status, name in reversed(GRPC_CODES.items())} | {"UNIMPLEMENTED": 404}
# Reconnect quickly after the server was down (gRPC's default backoff grows to 120 s, during which every
# call fails at once): auto mode retries the server once per step and must find it back as soon as it is up.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class GrpcWire:
    """KServe v2 over gRPC to one server.

    Args:
        url: ``grpc://host:port`` or ``grpcs://host:port``.
        token: Bearer token, or ``None``.
        count: Called with (bytes sent, bytes received) after every attempt.

    Raises:
        ValueError: For a URL without a port, or with a path.
        ModuleNotFoundError: grpcio or tritonclient's gRPC modules are missing (the message says what to install).
    """

    def __init__(self, url: str, *, token: str | None, count: Callable[[int, int], None]) -> None:
        parts = urlsplit(url)
        if parts.port is None or parts.path not in ("", "/") or not parts.hostname:
            raise ValueError(f"A gRPC server URL is grpc://HOST:PORT or grpcs://HOST:PORT; got {url!r}.")
        self.grpc, self.pb, pb_grpc = grpc_modules()
        self.url, self.count = url, count
        target = parts.netloc
        if parts.scheme == "grpcs":
            credentials = self.grpc.ssl_channel_credentials()
            self._channel = self.grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self._channel = self.grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def where(self, operation: str, model_name: str) -> str:
        """The call an operation (``infer``, ``metadata``, ``ready``, ``stats``) makes, for messages."""
        calls = {"infer": "ModelInfer", "metadata": "ModelMetadata", "stats": "ModelStatistics"}
        return f"gRPC {calls.get(operation, 'ServerReady')} ({model_name})"

    def infer(
        self, model_name: str, parameters: Mapping[str, Any], inputs: Mapping[str, np.ndarray], *, timeout: float
    ) -> np.ndarray:
        """One ModelInfer call; returns ``hidden_states`` as sent (the request's wire dtype)."""
        request = encode_infer_request(inputs, model_name=model_name, parameters=parameters, outputs=(HIDDEN_STATES,))
        response = self._call("ModelInfer", request, timeout)
        try:
            return decode_infer_response(response).outputs[HIDDEN_STATES]
        except (ProtocolError, KeyError) as err:
            raise ServerUnavailable(
                f"{self.url} sent a malformed inference response ({err}); is it shadow-serve?"
            ) from err

    def ready(self, model_name: str, *, timeout: float) -> bool:
        """Whether the server is ready and serves the model."""
        server = self._call("ServerReady", self.pb.ServerReadyRequest(), timeout)
        model = self._call("ModelReady", self.pb.ModelReadyRequest(name=model_name), timeout)
        return server.ready and model.ready

    def metadata(self, model_name: str, *, timeout: float) -> dict[str, Any]:
        """The model metadata as the HTTP wire returns it, the ``shadowpeft`` object read from ModelConfig."""
        response = self._call("ModelMetadata", self.pb.ModelMetadataRequest(name=model_name), timeout)
        tensors = [
            [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in entries]
            for entries in (response.inputs, response.outputs)
        ]
        metadata: dict[str, Any] = {
            "name": response.name,
            "versions": list(response.versions),
            "platform": response.platform,
            "inputs": tensors[0],
            "outputs": tensors[1],
        }
        try:
            config = self._call("ModelConfig", self.pb.ModelConfigRequest(name=model_name), timeout).config
        except ServerRejected:  # a server without ModelConfig (UNIMPLEMENTED): nothing to compare
            return metadata
        if METADATA_KEY in config.parameters:
            try:
                metadata[METADATA_KEY] = json.loads(config.parameters[METADATA_KEY].string_value)
            except ValueError as err:
                raise ServerUnavailable(
                    f"{self.url} sent a ModelConfig whose {METADATA_KEY!r} parameter is not JSON ({err})."
                ) from err
        return metadata

    def stats(self, model_name: str, *, timeout: float) -> dict[str, Any]:
        """The Triton-style ``model_stats`` (over gRPC there are no ``sequences``: ask the HTTP port for those)."""
        response = self._call("ModelStatistics", self.pb.ModelStatisticsRequest(name=model_name), timeout)
        fields = ("name", "version", "last_inference", "inference_count", "execution_count")
        return {"model_stats": [{key: getattr(model, key) for key in fields} for model in response.model_stats]}

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any, timeout: float) -> Any:
        """One attempt of ``method``: its response, or the error for the status that came back."""
        sent = request.ByteSize()
        try:
            response = getattr(self._stub, method)(request, timeout=timeout, metadata=self._metadata)
        except self.grpc.RpcError as err:
            self.count(sent, 0)
            raise self._error(err) from err
        self.count(sent, response.ByteSize())
        return response

    def _error(self, err: Any) -> Exception:
        code = err.code() if callable(getattr(err, "code", None)) else None
        name = code.name if code is not None else "UNKNOWN"
        message = (err.details() if callable(getattr(err, "details", None)) else None) or str(err)
        if name in _RETRY_CODES:
            trailing = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
            asked = dict(trailing or ()).get("retry-after")
            return Retryable(f"gRPC {name}: {message}", retry_after=retry_after_seconds(asked))
        if name == "ABORTED":
            return SessionLost(message)
        if name in _HTTP_STATUS and _HTTP_STATUS[name] < 500:
            return ServerRejected(
                f"{self.url} refused the request (gRPC {name}): {message}", status=_HTTP_STATUS[name]
            )
        return ServerUnavailable(f"{self.url} failed (gRPC {name}): {message}")
