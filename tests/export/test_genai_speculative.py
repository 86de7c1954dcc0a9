"""The detached shadow drafts for onnxruntime-genai's speculative decoding (export/genai_speculative.py)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest

from shadowpeft.export.errors import ExportError
from shadowpeft.export.genai_config import GENAI_CONFIG_NAME
from shadowpeft.export.genai_speculative import speculative_config, write_speculative_folder
from tests.export.genai_run import genai_greedy

PROMPTS = ([2, 10, 11, 12], [2, 20, 30, 40, 50, 60])
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A toy base with 16-wide heads (GroupQueryAttention's least), its detached export and its genai model.

    The target is the plain base as onnxruntime-genai's own model builder writes it (GroupQueryAttention, fp32).
    """
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoModelForCausalLM

    from shadowpeft import get_shadow_model
    from shadowpeft.checkpoint.store import save_shadow
    from shadowpeft.export.pipeline import ExportOptions, export_checkpoint
    from tests.conftest import perturb
    from tests.toy import save_toy_base

    root = tmp_path_factory.mktemp("genai-speculative")
    base = save_toy_base(root / "base", hidden_size=64)
    model = perturb(get_shadow_model(AutoModelForCausalLM.from_pretrained(base)))
    save_shadow(model, root / "ckpt", base_ref=str(base))
    export_checkpoint(root / "ckpt", root / "export", ExportOptions(selections=("detached",)))
    builder = ["builder", "-m", "toy", "-i", str(base), "-o", str(root / "target"), "-p", "fp32", "-e", "cpu"]
    with mock.patch.object(sys, "argv", [*builder, "-c", str(root / "cache")]):  # its CLI, in this process
        runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    return {"base": base, "export": root / "export", "target": root / "target", "root": root}


def test_shadow_drafts_for_the_plain_base_without_changing_its_tokens(toy):
    folder = write_speculative_folder(toy["target"], toy["export"], toy["root"] / "speculative", max_draft_tokens=3)
    config = json.loads((folder / GENAI_CONFIG_NAME).read_text())
    assert config["model"]["draft"]["filename"] == "draft/shadow.onnx" and (folder / "draft" / "shadow.onnx").is_file()
    assert config["search"]["past_present_share_buffer"] is False
    for prompt in PROMPTS:
        plain, plain_stats = genai_greedy(toy["target"], list(prompt), NEW_TOKENS)
        speculative, stats = genai_greedy(folder, list(prompt), NEW_TOKENS)
        assert plain_stats["draft_tokens_proposed"] == 0
        assert speculative == plain  # greedy verification keeps the target's own tokens
        assert stats["draft_tokens_proposed"] > 0 and stats["draft_forward_passes"] > 0  # the shadow did draft


def test_a_draft_equal_to_its_target_is_always_accepted(toy):
    """Identity control: the shadow drafting for itself. Every draft accepted shows onnxruntime-genai computes
    the shadow's tokens right, KV cache rewinds and multi-token verify forwards included."""
    device = toy["export"] / "device"
    folder = write_speculative_folder(device, toy["export"], toy["root"] / "identity", max_draft_tokens=4)
    for prompt in PROMPTS:
        alone, _ = genai_greedy(device, list(prompt), NEW_TOKENS)
        drafted, stats = genai_greedy(folder, list(prompt), NEW_TOKENS)
        assert drafted == alone
        assert stats["draft_tokens_accepted"] > 0 and stats["acceptance_rate"] == 1.0


def test_a_target_with_another_vocabulary_is_refused():
    target = {"model": {"vocab_size": 100, "decoder": {"filename": "model.onnx"}}, "search": {}}
    draft = {"model": {"vocab_size": 128, "decoder": {"filename": "shadow.onnx"}}}
    with pytest.raises(ExportError, match=r"target model's vocabulary \(100\) differs from the shadow's \(128\)"):
        speculative_config(target, draft, max_draft_tokens=4)
    with pytest.raises(ExportError, match=r"max_draft_tokens must be in 1\.\.16"):
        speculative_config(target, {**draft, "model": {**draft["model"], "vocab_size": 100}}, max_draft_tokens=0)


def test_an_existing_folder_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        write_speculative_folder(tmp_path, tmp_path, tmp_path / "out")
