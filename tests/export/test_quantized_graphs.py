"""Quantized exported graphs: the head is quantized, files shrink, and they still run and agree."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from shadowpeft import get_shadow_model
from shadowpeft.export.ort_format import convert_to_ort
from shadowpeft.export.quality import quantized_agreement
from shadowpeft.export.quantize import INT8_BLOCK_SIZE, quantize_graph
from shadowpeft.runtime.contract import DEVICE_HEAD, DEVICE_SHADOW
from tests.conftest import no_dropout_config, perturb, tiny_base
from tests.export.graph_export import export_graphs
from tests.tolerances import BROKEN_PASS_KL, BROKEN_PASS_TOP1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = perturb(get_shadow_model(tiny_base("llama"), no_dropout_config())).eval()
    return export_graphs(model, tmp_path_factory.mktemp("fp32"), (DEVICE_SHADOW, DEVICE_HEAD))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_head_weight_is_quantized_and_files_shrink(exported, weights, tmp_path):
    d = exported.model.hidden_size
    vocab = exported.model.base.get_output_embeddings().weight.shape[0]
    files = {}
    for key, src in exported.files.items():
        dst = tmp_path / exported.root.name / src.relative_to(exported.root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        result = quantize_graph(src, dst, weights=weights, block_size=16)
        assert result.bytes_after < result.bytes_before, key
        files[key] = dst
    head = onnx.load(str(files[DEVICE_HEAD]))
    ops = {node.op_type for node in head.graph.node}
    assert "MatMul" not in ops, "the head MatMul stayed in float"
    (node,) = [n for n in head.graph.node if n.op_type == "MatMulNBits"]
    attributes = {a.name: a.i for a in node.attribute}
    bits, block = (8, INT8_BLOCK_SIZE) if weights == "int8" else (4, 16)
    assert (attributes["K"], attributes["N"], attributes["bits"], attributes["block_size"]) == (d, vocab, bits, block)
    # Quantized graphs load and run; agreement with fp32 is reported (a random tiny model's logits
    # are too flat for a meaningful threshold: the slow SmolLM2 test asserts one).
    figures = quantized_agreement(exported.sessions(), exported.sessions(files), exported.ios, None, prefix=weights)
    # A broken pass agrees on ~1% of positions with a mean KL of ~10; these bounds catch that.
    assert figures[f"{weights}.detached.top1_agreement"] >= BROKEN_PASS_TOP1
    assert 0.0 <= figures[f"{weights}.detached.mean_kl"] <= BROKEN_PASS_KL


def test_ort_format_copy_loads_and_gives_the_same_logits(exported, tmp_path):
    src = exported.files[DEVICE_HEAD]
    dst = tmp_path / "head.onnx"
    dst.write_bytes(src.read_bytes())
    ort_path = convert_to_ort(dst)
    assert ort_path.suffix == ".ort" and ort_path.stat().st_size > 0
    hidden = np.random.default_rng(0).standard_normal((2, 3, exported.model.hidden_size)).astype(np.float32)
    a = ort.InferenceSession(str(dst)).run(None, {"hidden_states": hidden})[0]
    b = ort.InferenceSession(str(ort_path)).run(None, {"hidden_states": hidden})[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
