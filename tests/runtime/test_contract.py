"""Tests for shadowpeft.runtime.contract: graph keys, I/O names, dtypes, symbolic dims, wire and padding."""

from __future__ import annotations

import numpy as np
import pytest

from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    BATCH,
    CLOUD_BACKBONE,
    COUPLED,
    DEVICE_HEAD,
    DEVICE_SHADOW,
    FP16,
    FP32,
    GRAPH_KEYS,
    GRAPH_ROLES,
    HIDDEN_STATES,
    INPUT_IDS,
    INT4,
    INT8,
    LOGITS,
    MODEL_NAME,
    MODEL_VERSION,
    NO_QUANTIZATION,
    PAST_SEQUENCE,
    POSITION_IDS,
    ROLES,
    SEQUENCE,
    SEQUENCE_END,
    SEQUENCE_ID,
    SEQUENCE_LENGTH,
    SEQUENCE_OFFSET,
    SEQUENCE_START,
    SHADOW_KV_PREFIX,
    SHADOW_STATES,
    TOTAL_SEQUENCE,
    WEIGHT_FORMATS,
    WIRE_DTYPES,
    WIRE_INPUTS,
    WIRE_OUTPUT,
    GraphIO,
    GraphSpec,
    StackLayout,
    TensorSpec,
    cloud_backbone_io,
    coupled_io,
    detached_shadow_io,
    head_io,
    is_past_name,
    left_pad,
    past_key_name,
    positions_for,
    present_key_name,
    present_name_for,
    quantization_name,
)
from shadowpeft.runtime.manifest import Manifest

SIZES = {"num_layers": 3, "kv_heads": 2, "head_dim": 16, "hidden": 64}


def _by_name(specs: tuple[TensorSpec, ...]) -> dict[str, TensorSpec]:
    return {spec.name: spec for spec in specs}


def test_symbolic_dims() -> None:
    assert (BATCH, SEQUENCE, PAST_SEQUENCE, TOTAL_SEQUENCE) == (
        "batch_size",
        "sequence_length",
        "past_sequence_length",
        "total_sequence_length",
    )


def test_kv_names_follow_optimum() -> None:
    assert past_key_name(0, "key") == "past_key_values.0.key"
    assert past_key_name(11, "value") == "past_key_values.11.value"
    assert present_key_name(0, "key") == "present.0.key"
    assert present_key_name(3, "value") == "present.3.value"


@pytest.mark.parametrize(("layer", "kind"), [(-1, "key"), (0, "keys"), (True, "key"), ("0", "key")])
def test_kv_name_arguments_are_checked(layer: object, kind: str) -> None:
    with pytest.raises(ValueError, match=r"must be"):
        past_key_name(layer, kind)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be"):
        present_key_name(layer, kind)  # type: ignore[arg-type]


def test_detached_shadow_io() -> None:
    io = detached_shadow_io(**SIZES, vocab=128)
    assert isinstance(io, GraphIO)
    inputs, outputs = io
    assert [spec.name for spec in inputs] == [
        INPUT_IDS,
        ATTENTION_MASK,
        POSITION_IDS,
        *(past_key_name(i, kind) for i in range(3) for kind in ("key", "value")),
    ]
    assert [spec.name for spec in outputs] == [
        LOGITS,
        SHADOW_STATES,
        *(present_key_name(i, kind) for i in range(3) for kind in ("key", "value")),
    ]
    specs = _by_name(inputs + outputs)
    assert specs["input_ids"] == TensorSpec("input_ids", "int64", ("batch_size", "sequence_length"))
    assert specs["attention_mask"] == TensorSpec("attention_mask", "int64", ("batch_size", "total_sequence_length"))
    assert specs["position_ids"] == TensorSpec("position_ids", "int64", ("batch_size", "sequence_length"))
    assert specs["past_key_values.2.value"].shape == ("batch_size", 2, "past_sequence_length", 16)
    assert specs["present.2.value"].shape == ("batch_size", 2, "total_sequence_length", 16)
    assert specs["logits"].shape == ("batch_size", "sequence_length", 128)
    assert specs["shadow_states"].shape == ("batch_size", "sequence_length", 64)
    assert {specs[name].dtype for name in specs if name not in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)} == {
        "float32"
    }


def test_head_io() -> None:
    inputs, outputs = head_io(hidden=64, vocab=128)
    assert inputs == (TensorSpec(HIDDEN_STATES, "float32", ("batch_size", "sequence_length", 64)),)
    assert outputs == (TensorSpec(LOGITS, "float32", ("batch_size", "sequence_length", 128)),)


def test_cloud_backbone_io() -> None:
    inputs, outputs = cloud_backbone_io(**SIZES)
    assert [spec.name for spec in inputs[:4]] == [INPUT_IDS, SHADOW_STATES, ATTENTION_MASK, POSITION_IDS]
    assert len(inputs) == 4 + 2 * 3
    assert [spec.name for spec in outputs[:1]] == [HIDDEN_STATES]
    assert [spec.name for spec in outputs[1:]] == [present_key_name(i, k) for i in range(3) for k in ("key", "value")]
    specs = _by_name(inputs + outputs)
    assert specs["shadow_states"] == TensorSpec(SHADOW_STATES, "float32", ("batch_size", "sequence_length", 64))
    assert specs["hidden_states"].shape == ("batch_size", "sequence_length", 64)
    assert LOGITS not in specs


def test_cloud_backbone_io_with_logits() -> None:
    _, outputs = cloud_backbone_io(**SIZES, vocab=128)
    assert [spec.name for spec in outputs[:2]] == [HIDDEN_STATES, LOGITS]
    assert outputs[1].shape == ("batch_size", "sequence_length", 128)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_applies_to_float_tensors_only(dtype: str) -> None:
    inputs, outputs = detached_shadow_io(**SIZES, vocab=8, dtype=dtype)
    for spec in inputs + outputs:
        expected = "int64" if spec.name in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS) else dtype
        assert spec.dtype == expected, spec


@pytest.mark.parametrize(
    "build",
    [
        lambda: detached_shadow_io(**SIZES, vocab=128),
        lambda: cloud_backbone_io(**SIZES, vocab=128),
        lambda: head_io(hidden=64, vocab=128),
    ],
)
def test_builders_yield_valid_graph_specs(build) -> None:
    inputs, outputs = build()
    graph = GraphSpec("g.onnx", "coupled", 17, inputs, outputs, "fp32", "0" * 64)
    manifest = Manifest(1, "0.1.0", "base", None, "fp", {"g": graph}, 3, 64, (), None, "none", {})
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_cache_outputs_feed_cache_inputs() -> None:
    inputs, outputs = detached_shadow_io(**SIZES, vocab=8)
    past = [spec for spec in inputs if spec.name.startswith("past_key_values.")]
    present = [spec for spec in outputs if spec.name.startswith("present.")]
    assert [p.name.replace("past_key_values.", "present.") for p in past] == [p.name for p in present]
    for p, q in zip(past, present, strict=True):
        assert p.shape[:2] == q.shape[:2] and p.shape[3] == q.shape[3] and p.dtype == q.dtype


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({**SIZES, "vocab": 0}, r"vocab=0"),
        ({**SIZES, "num_layers": -1, "vocab": 8}, r"num_layers=-1"),
        ({**SIZES, "head_dim": 16.0, "vocab": 8}, r"head_dim=16\.0"),
        ({**SIZES, "vocab": 8, "dtype": "int64"}, r"dtype must be a float type .*; got 'int64'"),
        ({**SIZES, "vocab": 8, "dtype": "float64"}, r"got 'float64'"),
    ],
)
def test_builder_arguments_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        detached_shadow_io(**kwargs)  # type: ignore[arg-type]


def test_bad_sizes_are_listed_together() -> None:
    with pytest.raises(ValueError, match=r"got hidden=0, vocab=-1\."):
        head_io(hidden=0, vocab=-1)


# --- graph keys, KV name pairing, wire, weights, padding ------------------------------------------


def test_graph_keys_and_roles() -> None:
    assert GRAPH_KEYS == ("device/shadow", "device/head", "cloud/backbone", "coupled")
    assert set(GRAPH_ROLES) == set(GRAPH_KEYS)
    assert sorted(GRAPH_ROLES.values()) == sorted(ROLES)


def _every_graph_io() -> dict[str, GraphIO]:
    layout = StackLayout(SIZES["num_layers"], SIZES["kv_heads"], SIZES["head_dim"])
    return {
        DEVICE_SHADOW: detached_shadow_io(**SIZES, vocab=128),
        DEVICE_HEAD: head_io(hidden=64, vocab=128),
        CLOUD_BACKBONE: cloud_backbone_io(**SIZES),
        COUPLED: coupled_io(shadow=StackLayout(1, 2, 8), base=layout, hidden=64, vocab=128),
    }


@pytest.mark.parametrize("key", GRAPH_KEYS)
def test_every_graph_has_unique_names_and_a_present_for_each_past(key: str) -> None:
    inputs, outputs = _every_graph_io()[key]
    names = [spec.name for spec in inputs + outputs]
    assert len(names) == len(set(names)), names
    past = [spec for spec in inputs if is_past_name(spec.name)]
    present = {spec.name: spec for spec in outputs}
    for spec in past:
        assert present_name_for(spec.name) in present, spec.name
        assert present[present_name_for(spec.name)].shape[3] == spec.shape[3]
    assert not any(is_past_name(spec.name) for spec in outputs)
    assert len(past) == len([name for name in present if "present." in name])


def test_present_name_for_keeps_the_shadow_prefix() -> None:
    assert present_name_for("past_key_values.12.value") == "present.12.value"
    assert present_name_for(past_key_name(0, "key", prefix=SHADOW_KV_PREFIX)) == "shadow_present.0.key"
    assert is_past_name("shadow_past_key_values.1.key") and not is_past_name("present.1.key")
    assert not is_past_name("past_key_values.1.query") and not is_past_name(INPUT_IDS)
    with pytest.raises(ValueError, match=r"'present.0.key' is not a KV-cache input name"):
        present_name_for("present.0.key")


def test_toy_export_manifest_is_what_the_contract_declares(toy_export) -> None:
    manifest = Manifest.from_file(toy_export.export)
    assert set(manifest.graphs) == set(GRAPH_KEYS)
    for key, graph in manifest.graphs.items():
        assert graph.role == GRAPH_ROLES[key] and graph.file == f"{key}.onnx"
        assert len(set(graph.input_names + graph.output_names)) == len(graph.inputs) + len(graph.outputs)
        for name in graph.input_names:
            if is_past_name(name):
                assert present_name_for(name) in graph.output_names
    logits = manifest.graph(DEVICE_SHADOW).outputs[0]
    assert logits.name == LOGITS and manifest.vocab_size == logits.shape[-1]


def test_wire_names() -> None:
    assert MODEL_NAME == "shadow-backbone" and MODEL_VERSION == "1"
    assert (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END, SEQUENCE_OFFSET, SEQUENCE_LENGTH) == (
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "sequence_offset",
        "sequence_length",
    )
    assert WIRE_INPUTS == (INPUT_IDS, SHADOW_STATES) and WIRE_OUTPUT == HIDDEN_STATES
    assert set(WIRE_DTYPES) == {"float16", "float32"}


def test_weight_formats_and_quantization_names() -> None:
    assert WEIGHT_FORMATS == ("fp32", "fp16", "int8", "int4") == (FP32, FP16, INT8, INT4)
    assert quantization_name(FP32) == NO_QUANTIZATION == "none"
    assert quantization_name(INT8, block_size=64, accuracy_level=4) == "int8-block64-acc4"
    assert quantization_name(INT4, block_size=32, accuracy_level=0) == "int4-block32-acc0"
    with pytest.raises(ValueError, match=r"needs its block_size and accuracy_level"):
        quantization_name(INT4)
    with pytest.raises(ValueError, match=r"Unknown weight format 'int2'"):
        quantization_name("int2")


def test_left_pad_right_aligns_rows() -> None:
    ids, mask = left_pad([[5, 6], [7, 8, 9, 3], []])
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [7, 8, 9, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert ids.dtype == mask.dtype == np.int64
    padded, _ = left_pad([np.array([1]), [2, 3]], pad_id=9)
    np.testing.assert_array_equal(padded, [[9, 1], [2, 3]])


def test_positions_count_real_tokens_and_pad_with_one() -> None:
    _, mask = left_pad([[5, 6], [7, 8, 9, 3]])
    np.testing.assert_array_equal(positions_for(mask, 4), [[1, 1, 0, 1], [0, 1, 2, 3]])
    grown = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    np.testing.assert_array_equal(positions_for(grown, 1), [[2], [4]])
