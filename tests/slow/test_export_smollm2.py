"""Slow: export the real SmolLM2-135M-Instruct with a shadow, detached, int8 and int4, through the CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from shadowpeft import get_shadow_model
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export.cli import main
from shadowpeft.runtime.manifest_files import verify_files
from shadowpeft.runtime.tokenizer import RuntimeTokenizer
from tests.conftest import perturb
from tests.export.genai_run import genai_greedy, runtime_greedy
from tests.slow.conftest import requires_smollm2
from tests.tolerances import ONNX_VS_TORCH_FP32, QUANTIZED_TOP1_SMOLLM2

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.mark.parametrize(("weights", "profile"), [("int8", "x86-64-laptop"), ("int4", "arm64-phone")])
def test_detached_export_of_the_real_model(smollm2_fresh, tmp_path, weights, profile):
    base, _ = smollm2_fresh
    model = perturb(get_shadow_model(base), scale=0.02)
    save_shadow(model, tmp_path / "ckpt", base_ref="smollm2-135m-instruct")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, [str(tmp_path / "ckpt"), "-o", str(out), "--detached", "--device", profile])
    assert result.exit_code == 0, result.output
    manifest = verify_files(out)
    figures = manifest.validation
    assert manifest.graphs["device/shadow"].weights == weights
    # fp32 graph vs PyTorch over a padded prefill and 8 cached steps.
    # The bound is 1e-4 scaled by max(1, max|logit| / 10) (export/validate.py says why).
    assert figures["detached.logits_max_abs_diff"] <= figures["detached.logits_bound"]
    assert figures["detached.logits_bound"] >= ONNX_VS_TORCH_FP32  # never looser than the flat bound's base
    assert figures["detached.greedy_agreement"] == 1.0
    # Quantized vs fp32 on held-out text (the head and embedding dominate this graph's weights).
    assert figures[f"{weights}.detached.top1_agreement"] >= QUANTIZED_TOP1_SMOLLM2[weights]
    assert figures["device/shadow.bytes"] < figures["device/shadow.fp32_bytes"]
    if profile == "arm64-phone":  # ort_format = true
        assert "ort/device/shadow" in manifest.graphs
    # onnxruntime-genai opens the device folder: its tokenizer reads SmolLM2's files as ours does, and its
    # greedy tokens are the runtime's detached ones (export/genai_config.py).
    og = pytest.importorskip("onnxruntime_genai")
    tokenizer = RuntimeTokenizer.from_export(out, manifest)
    genai_tokenizer = og.Tokenizer(og.Model(str(out / "device")))
    for text in ("To be, or not to be, that is the question:", "The capital of France is"):
        ids = tokenizer.encode(text, chat=False)
        assert [int(i) for i in genai_tokenizer.encode(text)] == ids
        assert genai_greedy(out / "device", ids, 16)[0] == runtime_greedy(out, ids, 16)
