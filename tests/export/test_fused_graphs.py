"""Fused graphs (``shadow-export --ops``): onnxruntime's fused operators, same contract, same numbers."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from shadowpeft import get_shadow_model
from shadowpeft.arch.base import additive_mask
from shadowpeft.export import fused_ops
from shadowpeft.export.errors import ExportError
from shadowpeft.export.fused_layers import GRAPH_STACKS, plan_fusion
from shadowpeft.export.quantize import quantize_graph, unquantized_matmul_weights
from shadowpeft.export.validate import check_parity
from shadowpeft.runtime.contract import (
    ATTENTION_MASK,
    CLOUD_BACKBONE,
    COUPLED,
    DEVICE_SHADOW,
    INPUT_IDS,
    LOGITS,
    POSITION_IDS,
    positions_for,
)
from shadowpeft.runtime.kv import KVCache
from tests.conftest import no_dropout_config, perturb, tiny_base
from tests.export.graph_export import export_graphs
from tests.tolerances import ONNX_VS_TORCH_FP32

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")
FUSED_OPS = (
    "GroupQueryAttention",
    "RotaryEmbedding",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
)


def _op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _model(arch: str):
    return perturb(get_shadow_model(tiny_base(arch), no_dropout_config())).eval()


class _Ops(torch.nn.Module):
    """Every fused op once, over a caller's mask and positions."""

    def forward(self, q, k, v, past_k, past_v, mask, positions, cos, sin, weight):
        bias = additive_mask(mask, q.shape[1], q.dtype)
        q = fused_ops.rotary(q, positions, cos, sin, 4)
        k = fused_ops.rotary(k, positions, cos, sin, 2)
        out, present_k, present_v = fused_ops.gqa(q, k, v, past_k, past_v, *fused_ops.lengths(bias), bias, 4, 2, 0.25)
        normed, total = fused_ops.skip_rms_norm(out, q, weight, 1e-5)
        return fused_ops.rms_norm(normed, weight, 1e-6), total, present_k, present_v


def _op_inputs(batch: int, past: int, new: int, *, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    d = 16
    mask = torch.ones(batch, past + new, dtype=torch.long)
    mask[-1, :2] = 0  # the last row left-padded
    positions = torch.from_numpy(positions_for(mask.numpy(), new))
    angles = torch.arange(64)[:, None] / (10000 ** (torch.arange(0, d, 2) / d))[None]
    return (
        torch.randn(batch, new, 4 * d, generator=g),
        torch.randn(batch, new, 2 * d, generator=g),
        torch.randn(batch, new, 2 * d, generator=g),
        torch.randn(batch, 2, past, d, generator=g),
        torch.randn(batch, 2, past, d, generator=g),
        mask,
        positions,
        angles.cos(),
        angles.sin(),
        torch.randn(4 * d, generator=g),
    )


def test_each_fused_op_equals_its_pytorch_reference_in_onnxruntime(tmp_path):
    example = _op_inputs(2, 5, 3, seed=0)
    dynamic = [{axis: Dim.AUTO for axis in range(t.dim())} for t in example]
    program = torch.onnx.export(
        _Ops(), example, dynamo=True, dynamic_shapes=dynamic, custom_translation_table=fused_ops.TRANSLATIONS
    )
    program.save(str(tmp_path / "ops.onnx"))
    counts = _op_counts(tmp_path / "ops.onnx")
    assert [counts[op] for op in FUSED_OPS] == [1, 2, 1, 1]
    session = ort.InferenceSession(str(tmp_path / "ops.onnx"))
    names = [i.name for i in session.get_inputs()]
    # A chunk on a cache (batch 1: onnxruntime's GroupQueryAttention limit), a padded prefill, a padded decode step.
    for batch, past, new in ((1, 5, 3), (2, 0, 4), (2, 7, 1)):
        inputs = _op_inputs(batch, past, new, seed=batch + past)
        expected = [t.numpy() for t in _Ops()(*inputs)]
        actual = session.run(None, dict(zip(names, [t.numpy() for t in inputs], strict=True)))
        real = inputs[5][:, -new:].numpy().astype(bool)  # padded query rows are never read
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            diff = np.abs(a - e)[real] if index < 2 else np.abs(a - e)
            assert diff.max() <= 1e-5, (batch, past, new, index, diff.max())


@pytest.mark.parametrize("arch", LLAMA_STYLE)
def test_fused_graphs_match_pytorch_and_use_the_fused_operators(arch, tmp_path):
    model = _model(arch)
    fusion = plan_fusion(model, "auto")
    assert fusion.stacks == ("shadow", "base") and not fusion.reasons
    exported = export_graphs(model, tmp_path, fusion=fusion)

    results = {r.chain: r for r in check_parity(model, exported.sessions(), exported.ios, steps=8)}
    assert set(results) == {"detached", "split", "coupled"}
    for result in results.values():
        assert result.max_abs_diff <= ONNX_VS_TORCH_FP32, result
        assert result.greedy_agreement == 1.0, result

    shadow_layers, base_layers = model.shadow_model.config.num_hidden_layers, model.num_layers
    layers = {DEVICE_SHADOW: shadow_layers, CLOUD_BACKBONE: base_layers, COUPLED: shadow_layers + base_layers}
    for key, count in layers.items():
        ops = _op_counts(exported.files[key])
        assert ops["GroupQueryAttention"] == count, key
        assert ops["RotaryEmbedding"] == 2 * count, key
        assert ops["SkipSimplifiedLayerNormalization"] == count, key
        assert ops["Softmax"] == 0, key  # no attention left in standard operators
        assert fusion.in_graph(key) == GRAPH_STACKS[key]
        assert unquantized_matmul_weights(onnx.load(str(exported.files[key]))) == [], key


def test_fused_q_k_v_is_one_quantized_matmul_and_injections_stay_visible(tmp_path):
    model = _model("llama")
    standard = export_graphs(model, tmp_path / "standard", (COUPLED,))
    fused = export_graphs(model, tmp_path / "fused", (COUPLED,), fusion=plan_fusion(model, "auto"))
    graphs = {}
    for name, exported in (("standard", standard), ("fused", fused)):
        quantize_graph(exported.files[COUPLED], exported.root / "int4.onnx", weights="int4")
        graphs[name] = onnx.load(str(exported.root / "int4.onnx")).graph
    # Each attention's values come from a Split of one quantized MatMul: q, k and v in one weight.
    producer = {out: node for node in graphs["fused"].node for out in node.output}
    attentions = [node for node in graphs["fused"].node if node.op_type == "GroupQueryAttention"]
    assert len(attentions) == model.shadow_model.config.num_hidden_layers + model.num_layers
    for node in attentions:
        split = producer[node.input[2]]
        assert split.op_type == "Split" and len(split.output) == 3
        assert producer[split.input[0]].op_type == "MatMulNBits"
    # The injections and updates reach the quantizer as in the standard graph: the same weights stay
    # unquantized in both (too small for a block here), none is hidden from it.
    gate = model.shadow_config.update.gate_width
    adapter = (model.shadow_config.injection.rank, gate, 2 * gate)  # injection; update (d -> 2g, g -> d)
    fused_kept, standard_kept = (_unquantized_weights(graphs[name]) for name in ("fused", "standard"))
    assert fused_kept == [shape for shape in standard_kept if set(shape) & set(adapter)]
    assert fused_kept  # the comparison is not vacuous


def _unquantized_weights(graph: onnx.GraphProto) -> list[tuple[int, ...]]:
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    return sorted(shapes[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in shapes)


@pytest.mark.parametrize("arch", ["gemma", "gpt2"])
def test_other_families_keep_standard_operators_with_a_reason(arch):
    model = _model(arch)
    fusion = plan_fusion(model, "auto")
    assert fusion.stacks == ()
    assert set(fusion.reasons) == {"shadow", "base"}
    assert "standard" in fusion.describe()
    with pytest.raises(ExportError, match=r"--ops fused: cannot fuse the shadow stack: .*Use --ops auto"):
        plan_fusion(model, "fused")


def test_standard_ops_are_selectable():
    fusion = plan_fusion(_model("llama"), "standard")
    assert fusion.stacks == () and fusion.in_graph(COUPLED) == ()
    with pytest.raises(ExportError, match=r"--ops 'quick' is not one of auto, fused, standard"):
        plan_fusion(_model("llama"), "quick")


def test_multi_token_step_of_a_batch_on_a_cache_runs_row_by_row(tmp_path):
    """onnxruntime's GroupQueryAttention refuses (batch > 1, new > 1, past > 0); KVCache.run splits it."""
    model = _model("llama")
    exported = export_graphs(model, tmp_path, (DEVICE_SHADOW,), fusion=plan_fusion(model, "auto"))
    session = exported.sessions()[DEVICE_SHADOW]
    graph_io = exported.ios[DEVICE_SHADOW]
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 60, (2, 7))
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1, :2] = 0
    names = [spec.name for spec in graph_io.outputs]
    cache = KVCache.empty(graph_io, 2)
    cache.step(
        session,
        names,
        {INPUT_IDS: ids[:, :4], ATTENTION_MASK: mask[:, :4], POSITION_IDS: positions_for(mask[:, :4], 4)},
    )
    chunk = {INPUT_IDS: ids[:, 4:], ATTENTION_MASK: mask, POSITION_IDS: positions_for(mask, 3)}
    with pytest.raises(Exception, match="batch_size must be 1"):  # the operator's own limit, without the split
        session.run(names, {**chunk, **cache.past})
    logits = cache.step(session, names, chunk)[LOGITS]
    # Equal to one prefill of the whole prompt.
    whole = KVCache.empty(graph_io, 2).step(
        session, names, {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions_for(mask, 7)}
    )[LOGITS]
    real = mask[:, 4:].astype(bool)
    assert np.abs(logits - whole[:, 4:])[real].max() <= ONNX_VS_TORCH_FP32
    assert cache.length == 7


def test_positions_past_the_models_maximum_work_as_in_the_standard_graph(tmp_path):
    """The rotary values are computed for each step's positions: no table to run past."""
    model = _model("llama")
    limit = model.shadow_model.config.max_position_embeddings
    standard = export_graphs(model, tmp_path / "standard", (DEVICE_SHADOW,))
    fused = export_graphs(model, tmp_path / "fused", (DEVICE_SHADOW,), fusion=plan_fusion(model, "auto"))
    ids = np.random.default_rng(0).integers(4, 60, (1, 5))
    mask = np.ones((1, 5), dtype=np.int64)
    positions = np.arange(limit + 3, limit + 8)[None]
    logits = []
    for exported in (standard, fused):
        graph_io = exported.ios[DEVICE_SHADOW]
        names = [spec.name for spec in graph_io.outputs]
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask, POSITION_IDS: positions}
        logits.append(KVCache.empty(graph_io, 1).step(exported.sessions()[DEVICE_SHADOW], names, feeds)[LOGITS])
    assert np.abs(logits[0] - logits[1]).max() <= ONNX_VS_TORCH_FP32
