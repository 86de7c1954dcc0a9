"""What shadow-serve says about its model: the tensors it serves (metadata) and its Triton model config.

``GET /v2/models/{name}[/versions/1]`` answers the KServe v2 model metadata; ``.../config`` answers
Triton's model-configuration extension (what ``tritonclient``'s ``get_model_config`` reads): the JSON
form of Triton's ``ModelConfig`` message (``model_config.proto``), with its field names::

    name, platform, backend           shadow-backbone, onnxruntime_onnx, onnxruntime
    version_policy                    the one version served (1)
    max_batch_size: 0                 no batch dimension added: dims are the full shapes,
    input / output                      batch 1 first; data_type TYPE_*, dims with -1 for T
    sequence_batching                 stateful: each sequence's KV cache stays on the server; idle
                                        TTL and the sequences held at once (oldest.max_candidate_sequences)
    parameters                        string values: what a client needs beyond Triton's schema

Both answers are built from :func:`served_tensors`, so they cannot disagree. The config describes
what this server does, not ``shadow-triton``'s repository (:mod:`shadowpeft.export.triton`): there
Triton itself keeps the KV cache as implicit state, batches sequences and takes
``attention_mask``/``position_ids`` from the device; here the server computes them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from shadowpeft.runtime.contract import HIDDEN_STATES, INPUT_IDS, MODEL_NAME, MODEL_VERSION, SHADOW_STATES, GraphSpec
from shadowpeft.runtime.manifest import Manifest
from shadowpeft.runtime.sessions import SessionLimits

__all__ = ["ServedTensor", "model_config", "served_tensors"]

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: Datatypes ``shadow_states`` may come in; ``hidden_states`` goes back in the same one.
SHADOW_STATES_DATATYPES = ("FP32", "FP16")
# KServe v2 datatype -> Triton ModelConfig DataType (model_config.proto).
_CONFIG_TYPES = {"INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16"}


class ServedTensor(NamedTuple):
    """One input or output as the server takes or returns it (KServe datatype; -1: any length)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        """The KServe v2 ``$metadata_tensor`` form."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def config(self) -> dict[str, Any]:
        """Triton's ``ModelInput`` / ``ModelOutput`` JSON form."""
        return {"name": self.name, "data_type": _CONFIG_TYPES[self.datatype], "dims": list(self.shape)}


def served_tensors(hidden_size: int) -> tuple[tuple[ServedTensor, ...], tuple[ServedTensor, ...]]:
    """Inputs and outputs of one infer request: one sequence (batch 1) of T new tokens."""
    inputs = (
        ServedTensor(INPUT_IDS, "INT64", (1, -1)),
        ServedTensor(SHADOW_STATES, "FP32", (1, -1, hidden_size)),
    )
    return inputs, (ServedTensor(HIDDEN_STATES, "FP32", (1, -1, hidden_size)),)


def model_config(manifest: Manifest, graph: GraphSpec, *, hidden_size: int, limits: SessionLimits) -> dict[str, Any]:
    """The Triton ``ModelConfig`` (JSON form) of the served backbone.

    Args:
        manifest: The export's manifest (base model and fingerprint go into ``parameters``).
        graph: The served ``cloud/backbone`` graph (its sha256 goes into ``parameters``).
        hidden_size: Width ``d`` of ``shadow_states`` and ``hidden_states``.
        limits: The server's session limits (sequences held at once, idle TTL).
    """
    inputs, outputs = served_tensors(hidden_size)
    parameters = {
        "shadow_states_datatypes": ",".join(SHADOW_STATES_DATATYPES),
        "output_datatype": f"the datatype of {SHADOW_STATES}",
        "sequence_parameters": "sequence_id, sequence_start, sequence_end, sequence_offset",
        "max_tokens_per_session": str(limits.max_tokens),
        "base_model": manifest.base_model,
        "base_fingerprint": manifest.base_fingerprint,
        "graph_sha256": graph.sha256,
    }
    return {
        "name": MODEL_NAME,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"specific": {"versions": [int(MODEL_VERSION)]}},
        "max_batch_size": 0,
        "input": [{**tensor.config(), "format": "FORMAT_NONE"} for tensor in inputs],
        "output": [tensor.config() for tensor in outputs],
        "sequence_batching": {
            "max_sequence_idle_microseconds": round(limits.idle_ttl * 1_000_000),
            "oldest": {"max_candidate_sequences": limits.max_sessions},
        },
        "default_model_filename": graph.file.rsplit("/", 1)[-1],
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
    }
