"""``GET /v2/models/{name}[/versions/1]/config``: Triton's model configuration (runtime/model_config.py).

Read with ``tritonclient.http``'s ``get_model_config`` from a served toy export, parsed with the
``ModelConfig`` schema tritonclient ships, and compared with the metadata endpoint and with the
``config.pbtxt`` shadow-triton writes for the same graph. Auth, unknown models and methods answer
like every other endpoint.
"""

from __future__ import annotations

import httpx
import pytest
from google.protobuf import json_format
from tritonclient.http import InferenceServerClient
from tritonclient.utils import InferenceServerException

from tests.runtime.test_server import MODEL, TOKEN, _auth, export, running  # noqa: F401

LIMITS = {"max_sessions": 5, "idle_ttl": 2.5, "max_tokens": 96}


@pytest.fixture(scope="module")
def served(export):  # noqa: F811
    """(server, its model config, its model metadata), read with tritonclient."""
    with running(export, **LIMITS) as server:
        triton = InferenceServerClient(server.url.removeprefix("http://"))
        config = triton.get_model_config(MODEL, headers=_auth())
        assert triton.get_model_config(MODEL, model_version="1", headers=_auth()) == config
        metadata = triton.get_model_metadata(MODEL, headers=_auth())
        yield server, triton, config, metadata
        triton.close()


def test_get_model_config_describes_the_served_backbone(served, export) -> None:  # noqa: F811
    _, _, config, _ = served
    assert {key: config[key] for key in ("name", "platform", "backend", "max_batch_size")} == {
        "name": MODEL,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": 0,  # batch 1 is part of each shape, as the server takes one sequence per request
    }
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input_ids", "TYPE_INT64", [1, -1]),
        ("shadow_states", "TYPE_FP32", [1, -1, 32]),
    ]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("hidden_states", "TYPE_FP32", [1, -1, 32])
    ]
    assert config["sequence_batching"] == {
        "max_sequence_idle_microseconds": 2_500_000,
        "oldest": {"max_candidate_sequences": 5},
    }
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert parameters["shadow_states_datatypes"] == "FP32,FP16"
    assert parameters["max_tokens_per_session"] == "96"
    assert parameters["graph_sha256"] == export.graph("cloud/backbone").sha256
    assert parameters["base_fingerprint"] == export.manifest.base_fingerprint


def test_the_config_is_a_valid_triton_model_config(served) -> None:
    from shadowpeft.export.triton import model_config_schema

    message = json_format.ParseDict(served[2], model_config_schema().ModelConfig())  # unknown field: ParseError
    assert message.input[1].data_type == model_config_schema().TYPE_FP32
    assert list(message.output[0].dims) == [1, -1, 32]
    assert list(message.version_policy.specific.versions) == [1]


def test_the_config_agrees_with_the_metadata_endpoint(served) -> None:
    _, _, config, metadata = served
    assert metadata["platform"] == config["platform"] and metadata["name"] == config["name"]
    for key, tensors in (("input", metadata["inputs"]), ("output", metadata["outputs"])):
        described = [(t["name"], "TYPE_" + t["datatype"], t["shape"]) for t in tensors]
        assert described == [(t["name"], t["data_type"], t["dims"]) for t in config[key]]


def test_the_config_agrees_with_shadow_triton_on_the_tensors_both_serve(served, toy_export, tmp_path) -> None:
    """shadow-triton's repository serves the same graph with Triton batching and implicit KV state
    (so it takes attention_mask and position_ids too): shared tensors have the same types and dims."""
    from shadowpeft.export.triton import parse_model_config, write_triton_repository

    repo = write_triton_repository(toy_export.export, tmp_path / "repo")
    pbtxt = parse_model_config((repo / MODEL / "config.pbtxt").read_text())
    assert pbtxt.name == served[2]["name"] and pbtxt.backend == served[2]["backend"]
    theirs = {t.name: (t.data_type, list(t.dims)) for t in (*pbtxt.input, *pbtxt.output)}
    schema = pbtxt.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    for tensor in (*served[2]["input"], *served[2]["output"]):
        data_type, dims = theirs[tensor["name"]]
        # Triton's dims leave out the batch dimension it adds (max_batch_size > 0); ours include it.
        assert (schema.values_by_number[data_type].name, dims) == (tensor["data_type"], tensor["dims"][1:])


def test_unknown_models_auth_and_methods_answer_like_the_other_endpoints(served) -> None:
    server, triton, _, _ = served
    for name, version in (("gpt", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as info:
            triton.get_model_config(name, model_version=version, headers=_auth())
        assert info.value.status() == "404"
        assert "Unknown model" in info.value.message() and f"This server serves {MODEL!r}" in info.value.message()
    url = f"{server.url}/v2/models/{MODEL}/config"
    missing = httpx.get(url)
    assert missing.status_code == 401 and "bearer" in missing.json()["error"]
    wrong = httpx.get(url, headers=_auth("wrong-token-0123456789abcdef"))
    assert wrong.status_code == 401 and "token is wrong" in wrong.json()["error"]
    posted = httpx.post(url, headers=_auth(), content=b"{}")
    assert posted.status_code == 405 and "Method Not Allowed" in posted.json()["error"]
    assert httpx.get(f"{server.url}/v2", headers=_auth()).json()["extensions"] == [
        "binary_tensor_data",
        "sequence",
        "model_configuration",
    ]
    assert TOKEN not in httpx.get(url, headers=_auth()).text
