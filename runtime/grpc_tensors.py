"""KServe v2 / Open Inference Protocol tensors over gRPC: numpy arrays <-> ``inference.*`` protobuf messages.

Pure functions, and the status-code mapping (:data:`GRPC_CODES`), shared by the gRPC server
(:mod:`shadowpeft.runtime.grpc_server`) and the device's gRPC wire (:mod:`shadowpeft.runtime.wire_grpc`):
the gRPC twin of :mod:`shadowpeft.runtime.protocol`::

    ModelInferRequest  inputs [{name, datatype, shape, contents?}], raw_input_contents [bytes per input]
                       parameters {key: InferParameter(bool|int64|uint64|double|string)}
    ModelInferResponse outputs [{name, datatype, shape}], raw_output_contents [bytes per output]

A request carries every input either in ``raw_input_contents`` (little-endian, row-major, as
tritonclient sends them) or in its typed ``contents`` field (FP16 has none: raw only). Responses
always carry raw contents. Sequence parameters (``sequence_id``, ``sequence_start``, ...) travel
as ``InferParameter``s under the same names as over HTTP (:mod:`shadowpeft.runtime.contract.wire`).

The message classes are the KServe v2 / Triton ``grpc_service.proto`` modules that
``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2``): the exact schema Triton and its
clients speak, with nothing generated or copied into this repository. Every decoder raises
:class:`~shadowpeft.runtime.errors.ProtocolError` naming the tensor, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from shadowpeft.runtime.errors import ProtocolError
from shadowpeft.runtime.protocol import DATATYPES, InferRequest, InferResponse, datatype_of

__all__ = [
    "GRPC_CODES",
    "GRPC_INSTALL_HINT",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
    "grpc_modules",
    "parameter_value",
    "set_parameter",
]

#: What to install for gRPC (server and device), named in every "gRPC is not installed" error.
GRPC_INSTALL_HINT = "pip install grpcio==1.85.3 'tritonclient[grpc]==2.73.0' protobuf==6.33.6"

#: gRPC status code name for each HTTP status the service refuses with.
GRPC_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",  # the sequence is gone or out of sync: retry at a higher level (re-prefill)
    413: "RESOURCE_EXHAUSTED",  # what gRPC itself answers for a message over the size limit
    415: "INVALID_ARGUMENT",
    500: "INTERNAL",
    503: "UNAVAILABLE",  # retry (after `retry-after` seconds)
}

# The typed `contents` field of InferTensorContents per datatype (FP16 has none: raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_MAX_RANK = 16


def grpc_modules() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``(grpc, service_pb2, service_pb2_grpc)``, imported on first use.

    Raises:
        ModuleNotFoundError: When grpcio or tritonclient's gRPC modules are not installed, saying what to install.
    """
    try:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except (ImportError, RuntimeError) as err:  # tritonclient.grpc raises RuntimeError without grpcio
        raise ModuleNotFoundError(
            f"KServe v2 over gRPC needs grpcio and tritonclient's gRPC modules ({err}). Install them: "
            f"{GRPC_INSTALL_HINT} (or shadowpeft[grpc]), or use HTTP (http://...)."
        ) from None
    return grpc, service_pb2, service_pb2_grpc


# --- parameters --------------------------------------------------------------------------------------


def parameter_value(parameter: Any, key: str) -> bool | int | float | str:
    """The Python value of an ``InferParameter`` (its one set field).

    Raises:
        ProtocolError: When no field is set.
    """
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise ProtocolError(f"Parameter {key!r} has no value; set one of bool_param, int64_param, string_param, ...")
    return getattr(parameter, choice)


def set_parameter(parameter: Any, value: bool | int | float | str, key: str) -> None:
    """Sets ``parameter`` (an ``InferParameter``) to ``value``: bool, int64 (uint64 beyond it), double or string."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        parameter.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        parameter.uint64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    elif isinstance(value, str):
        parameter.string_param = value
    else:
        raise ProtocolError(f"Parameter {key!r}: {value!r} is not a bool, 64-bit integer, number or string.")


def _parameters(entries: Any) -> dict[str, Any]:
    return {key: parameter_value(entries[key], key) for key in entries}


# --- requests and responses --------------------------------------------------------------------------


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str = "",
    parameters: Mapping[str, Any] | None = None,
    outputs: tuple[str, ...] = (),
    request_id: str = "",
) -> Any:
    """A ``ModelInferRequest`` carrying ``inputs`` as raw contents, in order."""
    _, pb, _ = grpc_modules()
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for key, value in (parameters or {}).items():
        set_parameter(request.parameters[key], value, key)
    for name, array in inputs.items():
        datatype, raw = _raw(np.asarray(array))
        request.inputs.add(name=name, datatype=datatype, shape=list(np.shape(array)))
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_infer_request(request: Any) -> InferRequest:
    """The tensors, parameters and requested outputs of a ``ModelInferRequest``.

    Raises:
        ProtocolError: For a malformed tensor, parameter or requested output.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in "
            "order, or none (typed contents)."
        )
    inputs = _tensors(request.inputs, raw, "inputs")
    outputs: dict[str, bool] | None = None
    if len(request.outputs):
        outputs = {}
        for entry in request.outputs:
            if "classification" in entry.parameters:
                raise ProtocolError(f"Output {entry.name!r}: the classification extension is not supported.")
            outputs[entry.name] = True
    return InferRequest(inputs, _parameters(request.parameters), outputs, True, request.id or None)


def encode_infer_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str = "",
    parameters: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> Any:
    """A ``ModelInferResponse`` carrying ``outputs`` as raw contents."""
    _, pb, _ = grpc_modules()
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id or "")
    for key, value in (parameters or {}).items():
        set_parameter(response.parameters[key], value, key)
    for name, array in outputs.items():
        datatype, raw = _raw(np.asarray(array))
        response.outputs.add(name=name, datatype=datatype, shape=list(np.shape(array)))
        response.raw_output_contents.append(raw)
    return response


def decode_infer_response(response: Any) -> InferResponse:
    """The outputs and parameters of a ``ModelInferResponse``.

    Raises:
        ProtocolError: For a malformed output tensor.
    """
    raw = list(response.raw_output_contents)
    if raw and len(raw) != len(response.outputs):
        raise ProtocolError(f"raw_output_contents has {len(raw)} entries for {len(response.outputs)} outputs.")
    outputs = _tensors(response.outputs, raw, "outputs")
    version = response.model_version or None
    return InferResponse(response.model_name, outputs, version, _parameters(response.parameters), response.id or None)


# --- tensors -----------------------------------------------------------------------------------------


def _raw(array: np.ndarray) -> tuple[str, bytes]:
    datatype = datatype_of(array.dtype)
    return datatype, np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def _tensors(entries: Any, raw: list[bytes], key: str) -> dict[str, np.ndarray]:
    if not len(entries):
        raise ProtocolError(f"'{key}' is empty; send at least one tensor.")
    tensors: dict[str, np.ndarray] = {}
    for index, entry in enumerate(entries):
        name, datatype = entry.name, entry.datatype
        if not name:
            raise ProtocolError(f"{key}[{index}] needs a non-empty name.")
        if name in tensors:
            raise ProtocolError(f"Tensor {name!r} appears twice in '{key}'; names must be unique.")
        if datatype not in DATATYPES:
            raise ProtocolError(
                f"Tensor {name!r}: unsupported datatype {datatype!r}. Supported: {', '.join(DATATYPES)}."
            )
        shape = tuple(entry.shape)
        if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
            raise ProtocolError(
                f"Tensor {name!r}: shape must be at most {_MAX_RANK} integers >= 0; got {list(shape)}."
            )
        dtype = DATATYPES[datatype]
        tensors[name] = (
            _from_raw(raw[index], name, dtype, shape) if raw else _from_contents(entry, name, datatype, shape)
        )
    return tensors


def _from_raw(data: bytes, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"Tensor {name!r}: shape {list(shape)} of {dtype.name} needs {expected} raw bytes; got {len(data)}."
        )
    if dtype.kind == "b":
        octets = np.frombuffer(data, dtype=np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise ProtocolError(f"Tensor {name!r}: BOOL bytes must be 0 or 1; got {int(octets.max())}.")
        return octets.astype(bool).reshape(shape)
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _from_contents(entry: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise ProtocolError(f"Tensor {name!r}: {datatype} travels in raw_input_contents only (no typed contents).")
    values = getattr(entry.contents, field)
    if len(values) != math.prod(shape):
        raise ProtocolError(
            f"Tensor {name!r}: shape {list(shape)} has {math.prod(shape)} elements, but contents.{field} has "
            f"{len(values)} (send every input as raw_input_contents or every one as contents)."
        )
    try:
        return np.array(values, dtype=DATATYPES[datatype].newbyteorder("=")).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"Tensor {name!r}: a value does not fit {datatype}: {exc}.") from None
