"""KServe v2 / Open Inference Protocol tensors over HTTP: JSON and the binary tensor extension.

Pure functions shared by the backbone server and its client (and compatible with ``tritonclient``).
A body is a JSON header, optionally followed by raw tensor bytes::

    body = JSON header (Inference-Header-Content-Length bytes) + tensor bytes, in tensor order
    header = {"inputs"|"outputs": [{"name", "datatype", "shape", "data" | "parameters": {"binary_data_size": n}}],
              "parameters": {...}, "id": "...", ...}

Without the ``Inference-Header-Content-Length`` HTTP header the whole body is JSON and every tensor
carries ``data`` (flat or nested, row-major). Binary tensors are raw little-endian, row-major; BOOL
is one byte per element (0 or 1). A request asks for binary outputs with the request parameter
``binary_data_output`` or per output with ``{"name", "parameters": {"binary_data": true}}``.

Every decoder raises :class:`~shadowpeft.runtime.errors.ProtocolError` naming the tensor, the value
received and what is allowed; nothing here trusts its input.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shadowpeft.runtime.errors import ProtocolError

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "InferResponse",
    "datatype_of",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "numpy_dtype",
    "parse_header_length",
]

#: HTTP header giving the size of the JSON part of a body that also carries binary tensors.
HEADER_LENGTH = "Inference-Header-Content-Length"

#: Protocol datatypes and their little-endian numpy types (BYTES and BF16 are not supported).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_MAX_RANK = 16
#: Deepest JSON nesting accepted: a request needs 3 levels plus one per tensor dimension (at most _MAX_RANK);
#: deeper input would reach Python's recursion limit in the parser (about 1,000 levels) or in code that walks it.
_MAX_JSON_DEPTH = 64
#: Most digits in a JSON integer: every protocol integer fits 64 bits (2**64 - 1 has 20 digits). Python refuses
#: to convert more than 4,300 digits, and converting thousands is quadratic.
_MAX_INT_DIGITS = 20
_HEADER_LENGTH_TEXT = re.compile(r"[0-9]{1,20}")
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')  # brackets inside strings do not nest
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_KINDS = {"b": "true or false", "u": "integers", "i": "integers", "f": "numbers"}


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request.

    Attributes:
        inputs: Input tensors by name (native byte order, writeable copies).
        parameters: The request's ``parameters`` object (empty if absent).
        outputs: Requested outputs by name -> whether each is wanted as binary data, or ``None``
            when the request names none (the server returns all of them).
        binary_outputs: The ``binary_data_output`` parameter: the default for outputs not listed.
        id: The request's ``id``, echoed in the response.
    """

    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, bool] | None = None
    binary_outputs: bool = False
    id: str | None = None


@dataclass(frozen=True)
class InferResponse:
    """A decoded inference response.

    Attributes:
        model_name: The model that answered.
        model_version: Its version, if the server gave one.
        outputs: Output tensors by name (native byte order, writeable copies).
        parameters: The response's ``parameters`` object (empty if absent).
        id: The request id the server echoed.
    """

    model_name: str
    outputs: dict[str, np.ndarray]
    model_version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy type of a protocol datatype (e.g. ``"FP16"`` -> ``float16``).

    Raises:
        ProtocolError: For a datatype this implementation does not support.
    """
    if isinstance(datatype, str) and datatype in DATATYPES:
        return DATATYPES[datatype]
    raise ProtocolError(f"Unsupported datatype {datatype!r}. Supported: {', '.join(DATATYPES)}.")


def datatype_of(dtype: np.dtype | type | str) -> str:
    """The protocol datatype of a numpy type (e.g. ``float32`` -> ``"FP32"``).

    Raises:
        ProtocolError: For a numpy type with no protocol datatype (e.g. ``complex64``, ``object``).
    """
    wanted = np.dtype(dtype)
    for name, known in DATATYPES.items():
        if (known.kind, known.itemsize) == (wanted.kind, wanted.itemsize):  # either byte order
            return name
    raise ProtocolError(f"numpy dtype {np.dtype(dtype)} has no protocol datatype. Supported: {', '.join(DATATYPES)}.")


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """Reads the ``Inference-Header-Content-Length`` HTTP header.

    Args:
        value: The header's value, or ``None`` when absent (the whole body is JSON).
        body_size: Size of the body in bytes.

    Raises:
        ProtocolError: If it is not a decimal integer (ASCII digits only) between 0 and ``body_size``.
    """
    if value is None:
        return None
    text = value.strip()
    # Not str.isdigit(): it accepts '²' and any number of digits, which int() then refuses.
    if not _HEADER_LENGTH_TEXT.fullmatch(text) or int(text) > body_size:
        raise ProtocolError(
            f"{HEADER_LENGTH} must be a decimal integer between 0 and the body size ({body_size}): the byte "
            f"length of the JSON part of the body; got {value[:40]!r}."
        )
    return int(text)


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    parameters: Mapping[str, Any] | None = None,
    outputs: Mapping[str, bool] | None = None,
    binary: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Encodes an inference request.

    Args:
        inputs: Input tensors by name, in the order to send.
        parameters: Request parameters (e.g. ``sequence_id``).
        outputs: Outputs to request by name -> binary or not; ``None`` asks for every output
            (as binary when ``binary``).
        binary: Send inputs as binary data (else as JSON ``data``).
        request_id: Optional request id.

    Returns:
        The body and the JSON header length to send as ``Inference-Header-Content-Length``
        (``None`` when the body is all JSON).
    """
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    params = dict(parameters or {})
    if outputs is None and binary:
        params["binary_data_output"] = True
    if params:
        header["parameters"] = params
    if outputs is not None:
        header["outputs"] = [{"name": name, "parameters": {"binary_data": bool(b)}} for name, b in outputs.items()]
    return _encode(header, "inputs", inputs, {name: binary for name in inputs})


def encode_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str | None = None,
    binary: bool | Mapping[str, bool] = True,
    parameters: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Encodes an inference response.

    Args:
        outputs: Output tensors by name, in order.
        model_name: The model that answered.
        model_version: Its version.
        binary: Whether to send outputs as binary data: one flag for all, or one per output name.
        parameters: Response parameters.
        request_id: The request's id, echoed.

    Returns:
        The body and the JSON header length (``None`` when the body is all JSON).
    """
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = dict(parameters)
    flags = {name: bool(binary if isinstance(binary, bool) else binary.get(name, False)) for name in outputs}
    return _encode(header, "outputs", outputs, flags)


def decode_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decodes an inference request.

    Args:
        body: The whole HTTP body.
        header_length: The ``Inference-Header-Content-Length`` value (see :func:`parse_header_length`).

    Raises:
        ProtocolError: For bad JSON, a missing or malformed field, an unsupported datatype, data
            that does not match its shape, or binary sizes that do not add up to the body.
    """
    header, tail = _split(body, header_length)
    inputs = _decode_tensors(header.get("inputs"), tail, "inputs")
    parameters = _parameters(header.get("parameters"), "request parameters")
    binary_outputs = parameters.get("binary_data_output", False)
    if not isinstance(binary_outputs, bool):
        raise ProtocolError(f"Parameter 'binary_data_output' must be true or false; got {binary_outputs!r}.")
    return InferRequest(inputs, parameters, _requested_outputs(header.get("outputs")), binary_outputs, _id(header))


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    """Decodes an inference response (status 200; errors are ``{"error": "..."}`` bodies).

    Raises:
        ProtocolError: As :func:`decode_request`, or for a missing ``model_name``.
    """
    header, tail = _split(body, header_length)
    outputs = _decode_tensors(header.get("outputs"), tail, "outputs")
    name, version = header.get("model_name"), header.get("model_version")
    if not isinstance(name, str):
        raise ProtocolError(f"A response needs a string 'model_name'; got {name!r}.")
    if version is not None and not isinstance(version, str):
        raise ProtocolError(f"'model_version' must be a string; got {version!r}.")
    parameters = _parameters(header.get("parameters"), "response parameters")
    return InferResponse(name, outputs, version, parameters, _id(header))


# --- encoding ---------------------------------------------------------------------------------------


def _encode(
    header: dict[str, Any], key: str, tensors: Mapping[str, np.ndarray], binary: Mapping[str, bool]
) -> tuple[bytes, int | None]:
    entries, chunks = [], []
    for name, value in tensors.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if binary[name]:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[entry["datatype"]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    header[key] = entries
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        raise ProtocolError("A JSON tensor holds NaN or infinity, which JSON cannot carry; use binary data.") from None
    if not chunks:
        return text, None
    return b"".join([text, *chunks]), len(text)


# --- decoding ---------------------------------------------------------------------------------------


def _split(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header as a dict and the binary tail after it."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ProtocolError(f"A body must be bytes; got {type(body).__name__}.")
    view = memoryview(body)
    size = len(view) if header_length is None else header_length
    if size < 0 or size > len(view):
        raise ProtocolError(f"{HEADER_LENGTH} {size} is outside the body of {len(view)} bytes.")
    raw = bytes(view[:size])
    depth = _nesting_depth(raw)
    if depth > _MAX_JSON_DEPTH:
        raise ProtocolError(
            f"The JSON part of the body nests arrays or objects too deeply: {depth} levels; this server reads at "
            f"most {_MAX_JSON_DEPTH}. Send tensor data flat (row-major) or nested once per dimension."
        )
    try:
        header = _JSON.decode(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"The JSON part of the body is not UTF-8 (byte {exc.start}); send JSON text.") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            f"The JSON part of the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            + (f" (the first {size} bytes, per {HEADER_LENGTH})." if header_length is not None else ".")
        ) from None
    except RecursionError:  # e.g. "[[[[...": Python's parser recurses once per level
        raise ProtocolError(
            "The JSON part of the body nests arrays or objects too deeply to parse; tensors are flat or [1, T, d]."
        ) from None
    if not isinstance(header, dict):
        raise ProtocolError(f"The JSON part of the body must be an object; got {type(header).__name__}.")
    return header, view[size:]


def _nesting_depth(text: bytes) -> int:
    """How deep arrays and objects nest in JSON ``text``, counted in C-speed passes before parsing it.

    Strings are blanked first (a bracket inside one does not nest); each remaining ``[`` or ``{``
    is one level down and each ``]`` or ``}`` one up. On invalid JSON the count can be off only
    after the point where the parser stops anyway.
    """
    marks = np.frombuffer(_JSON_STRING.sub(b'""', text).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not marks.size:
        return 0
    opening = (marks == ord("[")) | (marks == ord("{"))
    return int(np.cumsum(np.where(opening, 1, -1), dtype=np.int64).max())


def _bounded_int(text: str) -> int:
    """The JSON decoder's ``parse_int``: refuses integers too long for any protocol value before converting them."""
    digits = len(text) - text.startswith("-")
    if digits > _MAX_INT_DIGITS:
        shown = text if len(text) <= 24 else f"{text[:24]}..."
        raise ProtocolError(
            f"The JSON part of the body holds an integer of {digits} digits ({shown}); this protocol's "
            f"integers fit 64 bits (at most {_MAX_INT_DIGITS} digits). Send token ids, sizes and sequence ids "
            "as 64-bit integers."
        )
    return int(text)


_JSON = json.JSONDecoder(parse_int=_bounded_int)


def _decode_tensors(entries: Any, tail: memoryview, key: str) -> dict[str, np.ndarray]:
    if not isinstance(entries, list) or not entries:
        raise ProtocolError(f"'{key}' must be a non-empty array of tensors; got {_show(entries)}.")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for index, entry in enumerate(entries):
        name, dtype, shape = _tensor_head(entry, f"{key}[{index}]")
        if name in tensors:
            raise ProtocolError(f"Tensor {name!r} appears twice in '{key}'; names must be unique.")
        size = _parameters(entry.get("parameters"), f"tensor {name!r} parameters").get("binary_data_size")
        if size is None:
            tensors[name] = _from_json(entry, name, dtype, shape)
            continue
        if not _is_int(size) or size < 0:
            raise ProtocolError(f"Tensor {name!r}: binary_data_size must be an integer >= 0; got {size!r}.")
        if "data" in entry:
            raise ProtocolError(f"Tensor {name!r} has both 'data' and binary_data_size; send one of them.")
        if offset + size > len(tail):
            raise ProtocolError(
                f"Tensor {name!r} declares {size} binary bytes, but only {len(tail) - offset} remain in the body."
            )
        tensors[name] = _from_binary(tail[offset : offset + size], name, dtype, shape)
        offset += size
    if offset != len(tail):
        raise ProtocolError(
            f"The body has {len(tail) - offset} bytes after the last tensor; binary_data_size values must add up "
            f"to the body size minus {HEADER_LENGTH}."
        )
    return tensors


def _tensor_head(entry: Any, where: str) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where} must be an object with name, datatype and shape; got {_show(entry)}.")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{where} needs a non-empty string 'name'; got {_show(name)}.")
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(f"Tensor {name!r}: unsupported datatype {datatype!r}. Supported: {', '.join(DATATYPES)}.")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(
            f"Tensor {name!r}: shape must be an array of at most {_MAX_RANK} integers >= 0; got {_show(shape)}."
        )
    return name, DATATYPES[datatype], tuple(shape)


def _from_binary(raw: memoryview, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ProtocolError(
            f"Tensor {name!r}: shape {list(shape)} of {dtype.name} needs {expected} bytes; binary_data_size is "
            f"{len(raw)}."
        )
    if dtype.kind == "b":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise ProtocolError(f"Tensor {name!r}: BOOL bytes must be 0 or 1; got {int(octets.max())}.")
        return octets.astype(bool).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def _from_json(entry: dict[str, Any], name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if "data" not in entry:
        raise ProtocolError(f"Tensor {name!r} has neither 'data' nor a binary_data_size parameter.")
    items = entry["data"]
    if not isinstance(items, list):
        raise ProtocolError(f"Tensor {name!r}: 'data' must be an array; got {_show(items)}.")
    while items and all(isinstance(item, list) for item in items):  # nested row-major -> flat
        items = [value for row in items for value in row]
    if len(items) != math.prod(shape):
        raise ProtocolError(
            f"Tensor {name!r}: shape {list(shape)} has {math.prod(shape)} elements, but 'data' has {len(items)}."
        )
    if not all(_json_fits(value, dtype.kind) for value in items):
        bad = next(value for value in items if not _json_fits(value, dtype.kind))
        raise ProtocolError(
            f"Tensor {name!r}: {datatype_of(dtype)} data must be {_KINDS[dtype.kind]}; got {_show(bad)}."
        )
    try:
        return np.array(items, dtype=dtype.newbyteorder("=")).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise ProtocolError(f"Tensor {name!r}: a value does not fit {datatype_of(dtype)}: {exc}.") from None


def _json_fits(value: Any, kind: str) -> bool:
    if kind == "b":
        return isinstance(value, bool)
    if kind in "ui":
        return _is_int(value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _requested_outputs(entries: Any) -> dict[str, bool] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ProtocolError(f"'outputs' must be an array of {{name, parameters}} objects; got {_show(entries)}.")
    outputs: dict[str, bool] = {}
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ProtocolError(f"outputs[{index}] needs a non-empty string 'name'; got {_show(entry)}.")
        parameters = _parameters(entry.get("parameters"), f"output {name!r} parameters")
        binary = parameters.get("binary_data", False)
        if not isinstance(binary, bool):
            raise ProtocolError(f"Output {name!r}: binary_data must be true or false; got {binary!r}.")
        if parameters.get("classification", 0):
            raise ProtocolError(f"Output {name!r}: the classification extension is not supported; request raw data.")
        outputs[name] = binary
    return outputs


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object; got {_show(value)}.")
    return value


def _id(header: dict[str, Any]) -> str | None:
    value = header.get("id")
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"'id' must be a string; got {_show(value)}.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"
