"""KServe v2 tensor encoding (runtime/protocol.py): round trips, tritonclient compatibility, malformed input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shadowpeft.runtime.errors import ProtocolError
from shadowpeft.runtime.protocol import (
    DATATYPES,
    datatype_of,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    numpy_dtype,
    parse_header_length,
)


def _sample(datatype: str, shape=(2, 3)) -> np.ndarray:
    dtype = DATATYPES[datatype]
    rng = np.random.default_rng(0)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.normal(size=shape).astype(dtype)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    tensors = {"a": _sample(datatype), "empty": np.zeros((1, 0, 4), dtype=DATATYPES[datatype])}
    body, size = encode_request(tensors, parameters={"sequence_id": 7}, binary=binary, request_id="r1")
    assert (size is not None) == binary
    decoded = decode_request(body, size)
    assert decoded.id == "r1" and decoded.parameters["sequence_id"] == 7
    assert decoded.binary_outputs is binary and decoded.outputs is None
    for name, array in tensors.items():
        assert decoded.inputs[name].dtype == array.dtype and decoded.inputs[name].shape == array.shape
        np.testing.assert_array_equal(decoded.inputs[name], array)
        assert decoded.inputs[name].flags.writeable


@pytest.mark.parametrize("binary", [True, False, {"x": True, "y": False}])
def test_response_round_trip(binary) -> None:
    outputs = {"x": np.arange(6, dtype=np.float16).reshape(1, 2, 3), "y": np.array([[True, False]])}
    body, size = encode_response(outputs, model_name="m", model_version="1", binary=binary, parameters={"n": 2})
    decoded = decode_response(body, size)
    assert (decoded.model_name, decoded.model_version, decoded.parameters) == ("m", "1", {"n": 2})
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded.outputs[name], array)
        assert decoded.outputs[name].dtype == array.dtype


def test_requested_outputs_and_nested_json_data() -> None:
    header = {
        "inputs": [{"name": "ids", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}],
        "outputs": [{"name": "h", "parameters": {"binary_data": True}}, {"name": "g"}],
    }
    decoded = decode_request(json.dumps(header).encode())
    np.testing.assert_array_equal(decoded.inputs["ids"], [[1, 2], [3, 4]])
    assert decoded.outputs == {"h": True, "g": False}


def test_big_endian_input_is_sent_little_endian() -> None:
    array = np.arange(4, dtype=">f4")
    body, size = encode_request({"x": array})
    assert body[size:] == np.arange(4, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_request(body, size).inputs["x"], array)


def test_datatype_names() -> None:
    assert datatype_of(np.float16) == "FP16" and datatype_of(np.dtype(">i8")) == "INT64"
    assert numpy_dtype("BOOL") == np.bool_
    with pytest.raises(ProtocolError, match="complex64"):
        datatype_of(np.complex64)
    with pytest.raises(ProtocolError, match="'BYTES'"):
        numpy_dtype("BYTES")


def test_tritonclient_request_decodes_and_our_response_decodes_in_tritonclient() -> None:
    from tritonclient.http import InferInput, InferRequestedOutput, InferResult
    from tritonclient.http._utils import _get_inference_request

    ids, states = np.array([[1, 2, 3]], dtype=np.int64), np.ones((1, 3, 4), dtype=np.float16)
    inputs = [InferInput("input_ids", [1, 3], "INT64"), InferInput("shadow_states", [1, 3, 4], "FP16")]
    inputs[0].set_data_from_numpy(ids, binary_data=False)
    inputs[1].set_data_from_numpy(states, binary_data=True)
    body, size = _get_inference_request(
        inputs, "", [InferRequestedOutput("hidden_states", binary_data=True)], 42, True, False, 0, None, None
    )
    decoded = decode_request(body, size)
    np.testing.assert_array_equal(decoded.inputs["input_ids"], ids)
    np.testing.assert_array_equal(decoded.inputs["shadow_states"], states)
    assert decoded.parameters == {"sequence_id": 42, "sequence_start": True, "sequence_end": False}
    assert decoded.outputs == {"hidden_states": True}

    hidden = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    for binary in (True, False):
        body, size = encode_response({"hidden_states": hidden}, model_name="shadow-backbone", binary=binary)
        result = InferResult.from_response_body(body, header_length=size)
        np.testing.assert_array_equal(result.as_numpy("hidden_states"), hidden)


def _binary_body(entries: list[dict], tail: bytes) -> tuple[bytes, int]:
    text = json.dumps({"inputs": entries}).encode()
    return text + tail, len(text)


def _entry(name="x", datatype="FP32", shape=(2,), **extra) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


@pytest.mark.parametrize(
    ("body", "size", "match"),
    [
        (b"\xff\xfe garbage", None, "not UTF-8"),
        (b"{not json", None, "not valid JSON"),
        (b"[" * 100_000, None, "nests arrays or objects too deeply"),
        (b"[1, 2]", None, "must be an object; got list"),
        (b"{}", None, "'inputs' must be a non-empty array"),
        (json.dumps({"inputs": [5]}).encode(), None, r"inputs\[0\] must be an object"),
        (json.dumps({"inputs": [_entry(name="")]}).encode(), None, "non-empty string 'name'"),
        (json.dumps({"inputs": [_entry(datatype="BF16")]}).encode(), None, "unsupported datatype 'BF16'"),
        (json.dumps({"inputs": [_entry(shape=(-1,))]}).encode(), None, "shape must be an array"),
        (json.dumps({"inputs": [_entry(shape=(True,))]}).encode(), None, "shape must be an array"),
        (json.dumps({"inputs": [_entry()]}).encode(), None, "neither 'data' nor a binary_data_size"),
        (json.dumps({"inputs": [_entry(data=[1.0])]}).encode(), None, "has 2 elements, but 'data' has 1"),
        (json.dumps({"inputs": [_entry(data=[1.0, "a"])]}).encode(), None, "FP32 data must be numbers"),
        (json.dumps({"inputs": [_entry(datatype="INT8", data=[1, 300])]}).encode(), None, "does not fit INT8"),
        (json.dumps({"inputs": [_entry(datatype="INT64", data=[1, 2.5])]}).encode(), None, "must be integers"),
        (json.dumps({"inputs": [_entry(datatype="BOOL", data=[1, 0])]}).encode(), None, "true or false"),
        (json.dumps({"inputs": [_entry(data=[1, 2]), _entry(data=[1, 2])]}).encode(), None, "appears twice"),
        (json.dumps({"inputs": [_entry(data=[1, 2])], "parameters": []}).encode(), None, "parameters must be an obj"),
        (json.dumps({"inputs": [_entry(data=[1, 2])], "outputs": {}}).encode(), None, "'outputs' must be an array"),
        (json.dumps({"inputs": [_entry(data=[1, 2])], "id": 3}).encode(), None, "'id' must be a string"),
        (*_binary_body([_entry(parameters={"binary_data_size": 8})], b"\0" * 4), "only 4 remain"),
        (*_binary_body([_entry(parameters={"binary_data_size": 4})], b"\0" * 4), "needs 8 bytes"),
        (*_binary_body([_entry(parameters={"binary_data_size": 8})], b"\0" * 9), "1 bytes after the last tensor"),
        (*_binary_body([_entry(parameters={"binary_data_size": -8})], b""), "binary_data_size must be an integer"),
        (*_binary_body([_entry(datatype="BOOL", parameters={"binary_data_size": 2})], b"\0\7"), "0 or 1"),
        (*_binary_body([_entry(data=[1, 2], parameters={"binary_data_size": 8})], b"\0" * 8), "both 'data' and"),
        (b"{}", 9, "outside the body"),
    ],
)
def test_malformed_requests_raise_protocol_error(body: bytes, size: int | None, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_request(body, size)


def test_protocol_error_is_a_value_error_and_requests_check_their_parameters() -> None:
    assert issubclass(ProtocolError, ValueError)
    body = json.dumps({"inputs": [_entry(data=[1, 2])], "parameters": {"binary_data_output": "yes"}}).encode()
    with pytest.raises(ProtocolError, match="binary_data_output"):
        decode_request(body)
    outputs = [{"name": "h", "parameters": {"classification": 3}}]
    with pytest.raises(ProtocolError, match="classification"):
        decode_request(json.dumps({"inputs": [_entry(data=[1, 2])], "outputs": outputs}).encode())
    with pytest.raises(ProtocolError, match="model_name"):
        decode_response(json.dumps({"outputs": [_entry(data=[1, 2])]}).encode())


@pytest.mark.parametrize(("value", "expected"), [(None, None), ("0", 0), (" 12 ", 12)])
def test_parse_header_length(value, expected) -> None:
    assert parse_header_length(value, 12) == expected


# "\u00b2" (superscript two) passes str.isdigit() but not int(); 5,000 digits pass isdigit() but not int() either.
@pytest.mark.parametrize("value", ["-1", "13", "abc", "1e3", "", "0x1", "\u00b2", "9" * 5000])
def test_parse_header_length_refuses(value: str) -> None:
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        parse_header_length(value, 12)


def test_nan_cannot_travel_as_json() -> None:
    with pytest.raises(ProtocolError, match="use binary data"):
        encode_response({"x": np.array([np.nan], dtype=np.float32)}, model_name="m", binary=False)
    body, size = encode_response({"x": np.array([np.nan], dtype=np.float32)}, model_name="m")
    assert np.isnan(decode_response(body, size).outputs["x"]).all()


def test_json_nesting_and_integer_length_are_bounded() -> None:
    shape = (1,) * 16  # the deepest tensor a request may carry, nested once per dimension: 19 levels in all
    data: object = 1.0
    for _ in shape:
        data = [data]
    body = json.dumps({"inputs": [_entry(shape=shape, data=data)], "id": "[{" * 500}).encode()
    decoded = decode_request(body)  # brackets inside strings do not nest
    assert decoded.inputs["x"].shape == shape and decoded.id == "[{" * 500

    deep = b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}"  # Python's parser: RecursionError (a 500 before)
    with pytest.raises(ProtocolError, match="too deeply: 1001 levels; this server reads at most 64"):
        decode_request(deep)
    binary = decode_request(*_binary_body([_entry(parameters={"binary_data_size": 8})], b"[" * 8))
    assert binary.inputs["x"].shape == (2,)  # binary tensor bytes are not JSON: brackets there do not count

    huge = b'{"inputs": [], "id": ' + b"9" * 5000 + b"}"  # int() refuses over 4,300 digits (a 500 before)
    with pytest.raises(ProtocolError, match="an integer of 5000 digits"):
        decode_request(huge)
    with pytest.raises(ProtocolError, match=r"an integer of 21 digits .*at most 20 digits"):
        decode_request(json.dumps({"inputs": [], "parameters": {"sequence_id": -(10**20)}}).encode())
    largest = {"inputs": [_entry(datatype="UINT64", shape=(1,), data=[2**64 - 1])], "parameters": {"s": -(2**63)}}
    decoded = decode_request(json.dumps(largest).encode())
    assert decoded.inputs["x"][0] == 2**64 - 1 and decoded.parameters == {"s": -(2**63)}
