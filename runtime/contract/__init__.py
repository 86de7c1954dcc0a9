"""The export/runtime contract: the one place both sides read (torch-free).

Installed as ``shadowpeft.runtime.contract``. The exporter writes what it declares; the runtime, the
server and the client read names from here or from the manifest, never from their own literals::

    graph_io.py   graph keys and roles; every graph's tensor names, dtypes and symbolic shapes
    specs.py      TensorSpec, GraphSpec: the records that declare a graph (validated)
    weights.py    weight-format vocabulary and quantization names (the passes live in export)
    wire.py       served model name, KServe v2 sequence parameters, wire tensors and dtypes
    padding.py    the left-padding rule and position ids for batched calls
    fields.py     validation helpers shared by the specs and the manifest

The manifest itself (``shadowpeft.runtime.manifest``) is built from these records.
"""

from shadowpeft.runtime.contract.graph_io import (
    ATTENTION_MASK,
    BATCH,
    CLOUD_BACKBONE,
    COUPLED,
    DEVICE_HEAD,
    DEVICE_SHADOW,
    GRAPH_KEYS,
    GRAPH_ROLES,
    HIDDEN_STATES,
    INPUT_IDS,
    KV_KINDS,
    LOGITS,
    ORT_KEY_PREFIX,
    PAST_SEQUENCE,
    POSITION_IDS,
    SEQUENCE,
    SHADOW_KV_PREFIX,
    SHADOW_STATES,
    TOTAL_SEQUENCE,
    GraphIO,
    KVKind,
    StackLayout,
    cloud_backbone_io,
    coupled_io,
    detached_shadow_io,
    head_io,
    is_past_name,
    ort_copy_key,
    past_key_name,
    present_key_name,
    present_name_for,
)
from shadowpeft.runtime.contract.padding import left_pad, positions_for
from shadowpeft.runtime.contract.specs import DTYPES, ROLES, GraphRole, GraphSpec, TensorSpec
from shadowpeft.runtime.contract.weights import (
    FP16,
    FP32,
    INT4,
    INT4_ACCURACY_LEVELS,
    INT8,
    NO_QUANTIZATION,
    WEIGHT_FORMATS,
    WeightFormat,
    quantization_name,
)
from shadowpeft.runtime.contract.wire import (
    MODEL_NAME,
    MODEL_VERSION,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_LENGTH,
    SEQUENCE_OFFSET,
    SEQUENCE_START,
    WIRE_DTYPES,
    WIRE_INPUTS,
    WIRE_OUTPUT,
)

__all__ = [
    "ATTENTION_MASK",
    "BATCH",
    "CLOUD_BACKBONE",
    "COUPLED",
    "DEVICE_HEAD",
    "DEVICE_SHADOW",
    "DTYPES",
    "FP16",
    "FP32",
    "GRAPH_KEYS",
    "GRAPH_ROLES",
    "HIDDEN_STATES",
    "INPUT_IDS",
    "INT4",
    "INT4_ACCURACY_LEVELS",
    "INT8",
    "KV_KINDS",
    "LOGITS",
    "ORT_KEY_PREFIX",
    "MODEL_NAME",
    "MODEL_VERSION",
    "NO_QUANTIZATION",
    "PAST_SEQUENCE",
    "POSITION_IDS",
    "ROLES",
    "SEQUENCE",
    "SEQUENCE_END",
    "SEQUENCE_ID",
    "SEQUENCE_LENGTH",
    "SEQUENCE_OFFSET",
    "SEQUENCE_START",
    "SHADOW_KV_PREFIX",
    "SHADOW_STATES",
    "TOTAL_SEQUENCE",
    "WEIGHT_FORMATS",
    "WIRE_DTYPES",
    "WIRE_INPUTS",
    "WIRE_OUTPUT",
    "GraphIO",
    "GraphRole",
    "GraphSpec",
    "KVKind",
    "StackLayout",
    "TensorSpec",
    "WeightFormat",
    "cloud_backbone_io",
    "coupled_io",
    "detached_shadow_io",
    "head_io",
    "is_past_name",
    "ort_copy_key",
    "left_pad",
    "past_key_name",
    "positions_for",
    "present_key_name",
    "present_name_for",
    "quantization_name",
]
