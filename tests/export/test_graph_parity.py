"""Every supported family: the ONNX graphs equal the PyTorch model over a prefill and cached steps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from shadowpeft import get_shadow_model
from shadowpeft.export.quantize import unquantized_matmul_weights
from shadowpeft.export.validate import ChainRunner, check_parity, prompt_batch
from shadowpeft.runtime.contract import CLOUD_BACKBONE, COUPLED, DEVICE_HEAD, DEVICE_SHADOW, positions_for
from tests.conftest import ARCHS, no_dropout_config, perturb, tiny_base
from tests.export.graph_export import export_graphs
from tests.tolerances import ONNX_VS_TORCH_FP32


@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_match_pytorch_over_prefill_and_cached_steps(arch, tmp_path):
    model = perturb(get_shadow_model(tiny_base(arch), no_dropout_config())).eval()
    exported = export_graphs(model, tmp_path)
    sessions = exported.sessions()

    # detached graph == PyTorch detached; shadow -> backbone -> head == coupled == PyTorch attached,
    # on a left-padded batch of 2 (shapes the tracer never saw), an empty cache, then 8 cached steps.
    results = {r.chain: r for r in check_parity(model, sessions, exported.ios, steps=8)}
    assert set(results) == {"detached", "split", "coupled"}
    for result in results.values():
        assert result.max_abs_diff <= ONNX_VS_TORCH_FP32, result
        assert result.greedy_agreement == 1.0, result
        assert result.positions == 11 + 2 * 8  # 7 + 4 real prompt tokens, then 8 steps x 2 rows

    # The split chain and the coupled graph agree with each other directly, step by step.
    vocab = model.base.get_output_embeddings().weight.shape[0]
    ids, mask = prompt_batch(vocab, lengths=(6, 3), seed=5)
    split, coupled = ChainRunner("split", sessions, exported.ios), ChainRunner("coupled", sessions, exported.ios)
    for runner in (split, coupled):
        runner.start(2)
    new = ids
    for _ in range(4):
        a = split.step(new, mask, positions_for(mask, new.shape[1]))
        b = coupled.step(new, mask, positions_for(mask, new.shape[1]))
        valid = mask[:, -new.shape[1] :].astype(bool)
        assert np.abs(a - b)[valid].max() <= ONNX_VS_TORCH_FP32
        new = a[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(new)], axis=1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graph_structure_heads_are_weights_and_no_unused_last_update(arch, tmp_path):
    model = perturb(get_shadow_model(tiny_base(arch), no_dropout_config())).eval()
    exported = export_graphs(model, tmp_path, (DEVICE_SHADOW, DEVICE_HEAD, CLOUD_BACKBONE, COUPLED))
    d, vocab = model.hidden_size, model.base.get_output_embeddings().weight.shape[0]
    g = model.shadow_config.update.gate_width
    for key, path in exported.files.items():
        graph = onnx.load(str(path))
        # Declared I/O is the ONNX graph's I/O, symbolic dimension names included.
        declared = exported.ios[key]
        for values, specs in ((graph.graph.input, declared.inputs), (graph.graph.output, declared.outputs)):
            assert [v.name for v in values] == [s.name for s in specs]
            for value, spec in zip(values, specs, strict=True):
                dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert tuple(dims) == spec.shape, (key, spec.name)
        # Every MatMul weight is an initializer a quantizer can see: no head through a runtime Transpose.
        assert unquantized_matmul_weights(graph) == [], key
        weights = _matmul_weight_shapes(graph)
        if key != CLOUD_BACKBONE:
            assert (d, vocab) in weights, f"{key}: the head is not a ({d}, {vocab}) MatMul initializer"
        if key in (CLOUD_BACKBONE, COUPLED):
            # Updates run after base layers 1..L-2: one d->2g MatMul (gate and transform inputs) each;
            # the update after the last layer, whose output nothing reads, is not in the graph.
            assert weights.count((d, 2 * g)) == model.num_layers - 2, key
            # One injection up-projection (r, d) per base layer from layer 1 on, each its own weight.
            r = model.shadow_config.injection.rank
            assert weights.count((r, d)) == model.num_layers - 1, key


def _matmul_weight_shapes(graph: onnx.ModelProto) -> list[tuple[int, ...]]:
    shapes = {init.name: tuple(init.dims) for init in graph.graph.initializer}
    return [shapes[node.input[1]] for node in graph.graph.node if node.op_type == "MatMul" and node.input[1] in shapes]
