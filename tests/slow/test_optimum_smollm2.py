"""Optimum's ORTModelForCausalLM on a real SmolLM2 export: the same prompt ids and greedy tokens as the runtime.

Runs in the Optimum venv of tests/export/test_optimum_config.py (built there on first use, reused here).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from shadowpeft import get_shadow_model
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export.cli import main
from tests.conftest import perturb
from tests.interop.optimum_stack import optimum_python, probe, runtime_greedy
from tests.slow.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]

PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):"]


def test_optimum_generates_the_runtime_tokens_on_smollm2(smollm2_fresh, tmp_path):
    python = optimum_python()
    base, _ = smollm2_fresh
    save_shadow(perturb(get_shadow_model(base), scale=0.02), tmp_path / "ckpt", base_ref="smollm2-135m-instruct")
    out = tmp_path / "export"
    result = CliRunner().invoke(main, [str(tmp_path / "ckpt"), "-o", str(out), "--detached", "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    request = {"generate": str(out / "device"), "prompts": PROMPTS, "max_new_tokens": 16, "file_name": "shadow.onnx"}
    answer = probe(python, request)
    ids, tokens = runtime_greedy(out, PROMPTS, 16)
    assert answer["prompt_ids"] == ids  # transformers 4.57 tokenizes as the runtime does
    assert answer["tokens"] == tokens
