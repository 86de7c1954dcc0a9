"""Tests for shadowpeft.export.io_names: graph I/O names, dtypes and symbolic dims."""

from __future__ import annotations

import pytest

from shadowpeft.export.io_names import (
    ATTENTION_MASK,
    BATCH,
    HIDDEN_STATES,
    INPUT_IDS,
    LOGITS,
    PAST_SEQUENCE,
    POSITION_IDS,
    SEQUENCE,
    SHADOW_STATES,
    TOTAL_SEQUENCE,
    GraphIO,
    cloud_backbone_io,
    detached_shadow_io,
    head_io,
    past_key_name,
    present_key_name,
)
from shadowpeft.runtime.manifest import GraphSpec, Manifest, TensorSpec

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
