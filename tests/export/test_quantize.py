"""Tests for shadowpeft.export.quantize: int8 / int4 passes, hidden weights, and logit agreement."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from shadowpeft.export import quantize
from shadowpeft.export.errors import QuantizationError
from shadowpeft.export.quantize import (
    FORMATS,
    INT8_BLOCK_SIZE,
    MIN_QUANTIZED_DIM,
    agreement,
    quantize_graph,
    unquantized_matmul_weights,
)
from shadowpeft.export.quantize import graph as quantize_graph_module
from shadowpeft.export.quantize import passes as quantize_passes
from tests.tolerances import QUANTIZED_MEAN_KL_TOY as MAX_MEAN_KL
from tests.tolerances import QUANTIZED_TOP1_TOY as MIN_TOP1

D, HIDDEN, VOCAB = 64, 256, 128

# Every registered format that quantizes (thresholds: tests/tolerances.py).
QUANTIZING = [name for name, fmt in FORMATS.items() if fmt.quantizes]


def _mlp(*, transposed_head: bool = False, attention: bool = False) -> onnx.ModelProto:
    """x (B, T, D) -> MatMul w1 (D, HIDDEN) -> Relu -> MatMul head (HIDDEN, VOCAB) -> logits (B, T, VOCAB).

    transposed_head stores the head as (VOCAB, HIDDEN) behind a Transpose node, as a tied embedding
    would be; attention adds a MatMul of two activations (r @ r^T), which holds no weight.
    """
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((D, HIDDEN)) / math.sqrt(D)).astype(np.float32)
    head = (rng.standard_normal((HIDDEN, VOCAB)) * 4 / math.sqrt(HIDDEN / 2)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"), helper.make_node("Relu", ["h"], ["r"])]
    initializers = [numpy_helper.from_array(w1, "w1")]
    if transposed_head:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(head.T), "embed"))
        nodes.append(helper.make_node("Transpose", ["embed"], ["head_t"], name="tie", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["r", "head_t"], ["logits"], name="head"))
    else:
        initializers.append(numpy_helper.from_array(head, "head_w"))
        nodes.append(helper.make_node("MatMul", ["r", "head_w"], ["logits"], name="head"))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", VOCAB])]
    if attention:
        nodes.append(helper.make_node("Transpose", ["r"], ["r_t"], perm=[0, 2, 1]))
        nodes.append(helper.make_node("MatMul", ["r", "r_t"], ["scores"], name="scores"))
        outputs.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", "T", "T"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D])]
    graph = helper.make_graph(nodes, "mlp", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _runner(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(["logits"], dict(feed))[0]


def _feeds(count: int = 8) -> list[tuple[dict[str, np.ndarray], None]]:
    rng = np.random.default_rng(1)
    return [({"x": rng.standard_normal((2, 8, D)).astype(np.float32)}, None) for _ in range(count)]


@pytest.fixture
def fp32(tmp_path: Path) -> Path:
    path = tmp_path / "fp32" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(_mlp(), path)
    return path


def _weight_bearing_matmuls(model: onnx.ModelProto) -> list[str]:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in initializers]


@pytest.mark.parametrize(("weights", "op_type"), [("int8", "MatMulNBits"), ("int4", "MatMulNBits")])
def test_quantized_graph_loads_and_converts_every_matmul(fp32: Path, tmp_path: Path, weights, op_type) -> None:
    result = quantize_graph(fp32, tmp_path / f"{weights}.onnx", weights=weights)
    model = onnx.load(result.path)
    assert [node.op_type for node in model.graph.node].count(op_type) == 2
    assert result.quantized_matmuls == 2
    assert _weight_bearing_matmuls(model) == []
    names = {tensor.name for tensor in model.graph.initializer}
    assert not names & {"w1", "head_w"}, "the fp32 weights must be gone"
    float_values = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert float_values <= (D * HIDDEN + HIDDEN * VOCAB) / 16, "only scales stay fp32: 1 per column or per block"
    assert _runner(result.path)(_feeds(1)[0][0]).shape == (2, 8, VOCAB)
    assert result.bytes_before == fp32.stat().st_size
    assert result.bytes_after == result.path.stat().st_size


def test_int4_options_reach_matmulnbits(fp32: Path, tmp_path: Path) -> None:
    result = quantize_graph(fp32, tmp_path / "q.onnx", weights="int4", block_size=16, accuracy_level=1)
    assert (result.block_size, result.accuracy_level) == (16, 1)
    int8 = quantize_graph(fp32, tmp_path / "q8.onnx", weights="int8", block_size=16, accuracy_level=1)
    assert (int8.block_size, int8.accuracy_level) == (INT8_BLOCK_SIZE, 4), "int8 has fixed blocks and int8 compute"
    for path, expected in ((result.path, (4, 16, 1)), (int8.path, (8, INT8_BLOCK_SIZE, 4))):
        nodes = [node for node in onnx.load(path).graph.node if node.op_type == "MatMulNBits"]
        assert len(nodes) == 2
        for node in nodes:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == expected
            assert len(node.input) == 3, "symmetric: no zero_points input"


def test_sizes_shrink_int4_below_int8_below_fp32(fp32: Path, tmp_path: Path) -> None:
    int8 = quantize_graph(fp32, tmp_path / "int8.onnx", weights="int8")
    int4 = quantize_graph(fp32, tmp_path / "int4.onnx", weights="int4")
    assert (int8.block_size, int8.accuracy_level) == (INT8_BLOCK_SIZE, 4)
    assert int4.bytes_after < int8.bytes_after < fp32.stat().st_size
    assert int8.bytes_after / int8.bytes_before < 0.3  # 8 of 32 bits, plus one scale per 64 weights
    assert int4.bytes_after / int4.bytes_before < 0.2  # 4 of 32 bits, plus one scale per 32 weights


@pytest.mark.parametrize("weights", QUANTIZING)
def test_quantized_logits_agree_with_fp32(fp32: Path, tmp_path: Path, weights: str) -> None:
    result = quantize_graph(fp32, tmp_path / "q.onnx", weights=weights)
    measured = agreement(_runner(fp32), _runner(result.path), _feeds())
    assert measured.positions == 8 * 2 * 8
    assert measured.top1 >= MIN_TOP1[weights], measured
    assert 0 <= measured.mean_kl <= MAX_MEAN_KL[weights], measured


def test_logging_is_left_alone(fp32: Path, tmp_path: Path) -> None:
    # A fresh interpreter: onnxruntime configures the root logger on first import or first warning,
    # which pytest's own handlers would hide.
    script = f"""
import logging
from shadowpeft.export.quantize import quantize_graph
for weights in ("int8", "int4"):
    quantize_graph({str(fp32)!r}, {str(tmp_path)!r} + f"/{{weights}}.onnx", weights=weights)
root = logging.getLogger()
assert (root.handlers, root.level) == ([], logging.WARNING), (root.handlers, root.level)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "the quantizers must not print log lines"


def test_fp32_is_resaved_unchanged(fp32: Path, tmp_path: Path) -> None:
    result = quantize_graph(fp32, tmp_path / "copy.onnx", weights="fp32")
    assert (result.quantized_matmuls, result.block_size) == (0, None)
    assert onnx.load(result.path) == onnx.load(fp32)


@pytest.mark.parametrize("weights", QUANTIZING)
def test_output_is_byte_identical_on_repeat(fp32: Path, tmp_path: Path, weights: str) -> None:
    first = quantize_graph(fp32, tmp_path / "a" / "q.onnx", weights=weights)
    second = quantize_graph(fp32, tmp_path / "b" / "q.onnx", weights=weights)
    assert first.path.read_bytes() == second.path.read_bytes()


def test_failing_quantizer_leaves_no_output(fp32: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(quantize_passes, "quantize_dynamic", broken)
    dst = tmp_path / "out" / "q.onnx"
    with pytest.raises(QuantizationError, match=r"int8 quantizer failed on .*ValueError: boom"):
        quantize_graph(fp32, dst, weights="int8")
    assert list(dst.parent.iterdir()) == [], "neither dst nor a temporary may remain"


def test_failing_quantizer_keeps_the_previous_output(fp32: Path, tmp_path: Path, monkeypatch) -> None:
    dst = tmp_path / "q.onnx"
    quantize_graph(fp32, dst, weights="int4")
    before = dst.read_bytes()

    class Broken:
        def __init__(self, *args, **kwargs):
            raise AssertionError("unsupported")

    monkeypatch.setattr(quantize_passes, "_nbits_quantizer", lambda: Broken)
    with pytest.raises(QuantizationError, match="int4 quantizer failed"):
        quantize_graph(fp32, dst, weights="int4")
    assert dst.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fp32", "q.onnx"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"weights": "int3"}, r"Unknown weight format 'int3'\. Supported: fp32, int8, int4"),
        ({"weights": "fp16"}, r"'fp16' is not supported yet"),
        ({"weights": "int4", "block_size": 24}, r"power of two >= 16 .*got 24"),
        ({"weights": "int4", "block_size": 8}, r"power of two >= 16 .*got 8"),
        ({"weights": "int4", "accuracy_level": 7}, r"accuracy_level must be one of 0, 1, 2, 3, 4; got 7"),
    ],
)
def test_bad_options_are_named(fp32: Path, tmp_path: Path, options, message) -> None:
    with pytest.raises(QuantizationError, match=message):
        quantize_graph(fp32, tmp_path / "q.onnx", **options)
    assert not (tmp_path / "q.onnx").exists()


def test_missing_and_unreadable_sources_are_named(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"'.*missing\.onnx' does not exist"):
        quantize_graph(tmp_path / "missing.onnx", tmp_path / "q.onnx", weights="int8")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf \x00\x01\x02")
    with pytest.raises(QuantizationError, match=r"Cannot read ONNX graph '.*garbage\.onnx'"):
        quantize_graph(garbage, tmp_path / "q.onnx", weights="int8")


def test_source_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(_mlp(), src, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    data = src.with_name("model.onnx.data")
    result = quantize_graph(src, tmp_path / "out" / "model.onnx", weights="int4")
    assert result.bytes_before == src.stat().st_size + data.stat().st_size
    assert result.quantized_matmuls == 2
    measured = agreement(_runner(src), _runner(result.path), _feeds())
    assert measured.top1 >= MIN_TOP1["int4"]

    data.rename(tmp_path / "elsewhere.data")
    with pytest.raises(QuantizationError, match=r"Cannot read ONNX graph .*keep its \.data file beside it"):
        quantize_graph(src, tmp_path / "out" / "again.onnx", weights="int4")


def test_large_output_goes_to_external_data(fp32: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quantize_graph_module, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the graph were > 1.5 GiB
    result = quantize_graph(fp32, tmp_path / "q.onnx", weights="int8")
    locations = {
        entry.value
        for tensor in onnx.load(result.path, load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"q.onnx.data"}
    assert result.bytes_after == result.path.stat().st_size + (tmp_path / "q.onnx.data").stat().st_size
    assert agreement(_runner(fp32), _runner(result.path), _feeds(1)).top1 >= MIN_TOP1["int8"]


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_low_rank_adapter_weights_stay_fp32(tmp_path: Path, weights: str) -> None:
    """A rank-16 down/up pair (the shadow's injections) stays fp32; the head beside it is quantized."""
    rng = np.random.default_rng(0)
    tensors = {"down": (D, 16), "up": (16, D), "head_w": (D, VOCAB)}
    initializers = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in tensors.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "down"], ["low"], name="down_proj"),
        helper.make_node("MatMul", ["low", "up"], ["delta"], name="up_proj"),
        helper.make_node("Add", ["x", "delta"], ["h"], name="add"),
        helper.make_node("MatMul", ["h", "head_w"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "adapter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", VOCAB])],
        initializers,
    )
    src = tmp_path / "adapter.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    result = quantize_graph(src, tmp_path / "q.onnx", weights=weights)
    model = onnx.load(result.path)
    assert result.quantized_matmuls == 1 and MIN_QUANTIZED_DIM > 16
    assert sorted(_weight_bearing_matmuls(model)) == ["down_proj", "up_proj"]
    assert [n.name for n in model.graph.node if n.op_type == "MatMulNBits"] == ["head_Q" + weights[-1]]


def test_hidden_weights_are_listed() -> None:
    assert unquantized_matmul_weights(_mlp()) == []
    assert unquantized_matmul_weights(_mlp(attention=True)) == [], "activation @ activation holds no weight"
    assert unquantized_matmul_weights(_mlp(transposed_head=True)) == ["head"]


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_hidden_weight_stays_fp32_with_a_warning(tmp_path: Path, caplog, weights: str) -> None:
    src = tmp_path / "tied.onnx"
    onnx.save_model(_mlp(transposed_head=True), src)
    with caplog.at_level("WARNING", logger=quantize.__name__):
        result = quantize_graph(src, tmp_path / "q.onnx", weights=weights)
    assert result.quantized_matmuls == 1
    assert unquantized_matmul_weights(onnx.load(result.path)) == ["head"]
    assert "hidden behind other nodes stay fp32: head" in caplog.text


def test_in_place_quantization_drops_the_stale_data_file(tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    onnx.save_model(_mlp(), src, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    result = quantize_graph(src, src, weights="int4")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]
    assert result.quantized_matmuls == 2 and result.bytes_after == src.stat().st_size < result.bytes_before


def test_agreement_of_identical_logits_is_perfect() -> None:
    logits = np.random.default_rng(2).standard_normal((2, 5, 11)) * 1000  # large: log-softmax must not overflow
    measured = agreement(lambda feed: logits, lambda feed: logits.astype(np.float32), [({}, None)])
    assert measured.positions == 10
    assert measured.top1 == 1.0
    assert measured.mean_kl == pytest.approx(0.0, abs=1e-9)  # float32 rounding of the candidate only


def test_agreement_matches_a_hand_computed_case() -> None:
    # Position 0: p = (1/2, 1/2), q = (3/4, 1/4); both argmax 0 (first of a tie);
    #   KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    # Position 1: p = (sigmoid(1), sigmoid(-1)), q = p reversed; the argmaxes differ;
    #   KL = p0 ln(p0/p1) + p1 ln(p1/p0) = (p0 - p1) ln(p0/p1) = tanh(1/2) * 1.
    # Position 2: masked out, though it disagrees badly.
    reference = np.array([[[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]])
    candidate = np.array([[[math.log(3), 0.0], [0.0, 1.0], [0.0, 5.0]]])
    valid = np.array([[True, True, False]])
    measured = agreement(lambda feed: reference, lambda feed: candidate, [({}, valid)])
    assert (measured.top1, measured.positions) == (0.5, 2)
    assert measured.mean_kl == pytest.approx((0.5 * math.log(4 / 3) + math.tanh(0.5)) / 2, rel=1e-12)


def test_agreement_rejects_bad_inputs() -> None:
    logits = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="equal leading shapes"):
        agreement(lambda f: logits, lambda f: np.zeros((1, 2, 4)), [({}, None)])
    with pytest.raises(ValueError, match="equal leading shapes"):
        agreement(lambda f: logits, lambda f: logits, [({}, np.ones((2, 2), bool))])
    with pytest.raises(ValueError, match="candidate returned NaN"):
        agreement(lambda f: logits, lambda f: logits * np.nan, [({}, None)])
    with pytest.raises(ValueError, match="No valid positions"):
        agreement(lambda f: logits, lambda f: logits, [({}, np.zeros((1, 2), bool))])
