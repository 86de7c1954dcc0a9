"""Slow: the real SmolLM2 export run by the torch-free runtime, detached and coupled to a live shadow-serve."""

from __future__ import annotations

import pytest

from shadowpeft import get_shadow_model
from shadowpeft.checkpoint.store import save_shadow
from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
from shadowpeft.runtime.export_dir import open_export
from shadowpeft.runtime.generate import Generator
from shadowpeft.runtime.sampling import SamplingConfig
from shadowpeft.runtime.tokenizer import RuntimeTokenizer
from tests.conftest import perturb
from tests.runtime.test_coupled_live import client_for, serving
from tests.runtime.test_generate import graph_greedy, pytorch_greedy
from tests.slow.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]
GREEDY = SamplingConfig(max_new_tokens=8)


def test_detached_and_coupled_runtime_match_pytorch_on_the_real_model(smollm2_fresh, tmp_path):
    base, _ = smollm2_fresh
    model = perturb(get_shadow_model(base), scale=0.02).eval()
    save_shadow(model, tmp_path / "ckpt", base_ref="smollm2-135m-instruct")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "export", ExportOptions(selections=("split", "coupled")))
    export = open_export(tmp_path / "export")
    tokenizer = RuntimeTokenizer.from_export(export.root, export.manifest)
    prompts = [tokenizer.encode("What is the capital of France?"), tokenizer.encode("Name a color.")]

    detached = Generator(export).generate(prompts, GREEDY)
    assert [r.token_ids for r in detached] == pytorch_greedy(model, prompts, "detached", steps=8).tolist()
    with serving(export) as port:
        coupled = Generator(export, mode="coupled", client=client_for(port)).generate(prompts, GREEDY)
    expected = pytorch_greedy(model, prompts, "attached", steps=8).tolist()
    assert [r.token_ids for r in coupled] == expected == graph_greedy(export, prompts, "coupled", steps=8)
